"""Hydra override strings (`key=value`): parsed as Hydra reads them, and as a sweep shows
them: split, shortened, named."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override


def parse_overrides(lines: Sequence[str]) -> list[Override]:
    """Command-line overrides as Hydra's grammar reads them: the one parser of the commands'
    checks, the sweep's swept keys and the Optuna sweeper. Hydra is imported here, not at the
    top, so the commands start without it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(list(lines))


def quote_path_values(arguments: Sequence[str]) -> list[str]:
    """The command line with each `key=<path>` that Hydra's grammar cannot read quoted, so a
    path gptlab printed (a sweep job's `0-lr=0.001/...`) pastes back as is.

    Any other argument Hydra cannot read is a ConfigError that says how to quote its value.
    """
    from hydra.errors import OverrideParseException

    from gptlab.errors import ConfigError

    quoted = []
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if not sep or argument.startswith("-"):
            quoted.append(argument)
            continue
        try:
            parse_overrides([argument])
        except OverrideParseException as err:
            if not Path(value).expanduser().exists():
                reason = str(err).splitlines()[0]
                raise ConfigError(
                    f"{argument!r} is not an override Hydra can read ({reason}). Characters such "
                    f"as = , ( ) [ ] {{ }} and quotes are Hydra syntax inside a value: quote the "
                    f"value, with the shell's quotes around it, e.g. \"{key}='{value}'\"."
                ) from None
            escaped = value.replace("\\", "\\\\").replace("'", "\\'")
            argument = f"{key}='{escaped}'"
        quoted.append(argument)
    return quoted


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
