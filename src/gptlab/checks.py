"""What a config value must be: Hydra passes `abc` as a string where a number was meant, and
YAML's `true` is a bool, which Python also counts as an int."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
