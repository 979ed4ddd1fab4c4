"""What a config value must be: Hydra passes `abc` as a string where a number was meant, and
YAML's `true` is a bool, which Python also counts as an int."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from gptlab.errors import ConfigError


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(key: str, value: Any, minimum: int, hint: str = "") -> int:
    """`value` if it is a whole number >= `minimum`; `hint` says what else `key` accepts."""
    if not is_count(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be a whole number >= {minimum}{hint}.")
    return value


def reject_unknown(group: str, given: Collection[str], known: Collection[str], what: str) -> None:
    """A key no setting reads is named: a typo would otherwise be silently ignored."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        key = f"{group}.{unknown[0]}" if group else unknown[0]
        raise ConfigError(f"{key} is not {what}: use one of {', '.join(sorted(known))}.")
