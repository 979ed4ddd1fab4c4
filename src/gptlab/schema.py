"""Config values checked against the type hints of the class they configure.

A config group's keys are the fields of one dataclass (`GPTConfig`, `OptimizerSettings`,
`LoaderSettings`, ...) or the arguments of the class its `_target_` names (the callbacks, the
loggers). `check_fields` and `check_arguments` read those hints, so a key nothing reads and a
value of the wrong type are reported once, here, naming the key, before any class is built.
Ranges and checks across keys stay with each class.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gptlab.checks import reject_unknown
from gptlab.errors import ConfigError


def conforms(value: Any, hint: Any) -> bool:
    """Whether a config value (YAML's types: bool, int, float, str, None, lists) fits `hint`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is str or hint is pathlib.Path:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return not args or all(conforms(item, args[0]) for item in value)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping)
    return True  # a class the config cannot hold directly: the constructor judges it


def describe(hint: Any) -> str:
    """What `hint` accepts, in a config's words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return ", or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        choices = [str(arg) for arg in args]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} ({', '.join(describe(arg) for arg in args)})"
    if origin in (list, Sequence):
        return f"a list of {describe(args[0])}s" if args else "a list"
    names = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        pathlib.Path: "a path",
    }
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(key: str, value: Any, hint: Any) -> None:
    if not conforms(value, hint):
        raise ConfigError(f"{key}={value!r} must be {describe(hint)}.")


def check_fields(group: str, cls: type, values: Mapping[str, Any]) -> None:
    """`values` as the fields of dataclass `cls`: every key a field, every value its type."""
    hints = typing.get_type_hints(cls)
    known = [field.name for field in dataclasses.fields(cls) if field.init]
    reject_unknown(group, values, known, f"a {group or 'top-level'} setting")
    for key, value in values.items():
        check_value(f"{group}.{key}" if group else key, value, hints[key])


def init_parameters(
    target: Callable[..., Any], passes_on: Callable[..., Any] | None = None
) -> dict[str, Any] | None:
    """The keyword arguments `target` takes with their type hints; a class's `**kwargs` that it
    passes on to its base class are the base's arguments, and then those of `passes_on` (the
    class a logger hands them to). None: any keyword goes."""
    found: dict[str, Any] = {}
    passed_on = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    owners = [*(inspect.getmro(target) if inspect.isclass(target) else (target,))]
    for owner in [*owners, *([passes_on] if passes_on else [])]:
        function = owner.__init__ if inspect.isclass(owner) else owner
        if inspect.isclass(owner) and "__init__" not in vars(owner):
            continue
        parameters = inspect.signature(function).parameters
        try:
            hints = typing.get_type_hints(function)
        except (NameError, TypeError):  # a hint names a type this module cannot resolve
            # (WandbLogger's `experiment: Union["Run", ...]`): the others still check values.
            hints = {
                name: parameter.annotation
                for name, parameter in parameters.items()
                if not isinstance(parameter.annotation, str)
            }
        for name, parameter in parameters.items():
            if name != "self" and parameter.kind not in passed_on:
                found.setdefault(name, hints.get(name, Any))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return found
    return None


def check_arguments(
    group: str,
    target: Callable[..., Any],
    values: Mapping[str, Any],
    passes_on: Callable[..., Any] | None = None,
) -> None:
    """`values` as keyword arguments of `target` (a class: its `__init__`), Hydra's `_keys_`
    aside: every key an argument, every value its annotated type."""
    parameters = init_parameters(target, passes_on)
    if parameters is None:
        return
    given = {key: value for key, value in values.items() if not key.startswith("_")}
    name = getattr(target, "__qualname__", str(target))
    reject_unknown(group, given, list(parameters), f"an argument of {name}")
    for key, value in given.items():
        check_value(f"{group}.{key}", value, parameters[key])
