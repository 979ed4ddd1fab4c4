"""Hydra override strings (`key=value`): parsed as Hydra reads them, and as a sweep shows
them: split, shortened, named."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override


def parse_overrides(lines: Sequence[str]) -> list[Override]:
    """Command-line overrides as Hydra's grammar reads them: the one parser of the commands'
    checks, the sweep's swept keys and the Optuna sweeper. Hydra is imported here, not at the
    top, so the commands start without it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


def split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def as_number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def short_override(override: str) -> str:
    """`optimizer.lr=0.00024380478036384822` as `optimizer.lr=0.0002438`, for reading."""
    key, value = split_override(override)
    number = as_number(value)
    return f"{key}={number:.4g}" if number is not None and "." in value else override


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last part (`optimizer.lr` as `lr`) where that names it alone."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {
        key: part if last.count(part) == 1 else key for key, part in zip(keys, last, strict=True)
    }


def run_name(overrides: Sequence[str], swept: Sequence[str]) -> str:
    """What sets a sweep's run apart, e.g. `lr=0.001,drop_rate=0.1`: its swept overrides."""
    given = dict(split_override(o) for o in overrides)
    names = short_keys([key for key in swept if key in given])
    return ",".join(short_override(f"{name}={given[key]}") for key, name in names.items())
