"""What the scripts share: turning user mistakes into one clear message and an exit code."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from gptlab import resume  # noqa: F401  (registers the resolvers conf/hydra uses)
from gptlab.errors import ConfigError, TrainingInterrupted

T = TypeVar("T")

EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)

log = logging.getLogger(__name__)


def in_multirun() -> bool:
    """Whether this is one job of a Hydra sweep (`-m`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_config_error(task: Callable[..., T]) -> Callable[..., T]:
    """Print a ConfigError as its message alone and exit 2; HYDRA_FULL_ERROR=1 shows the stack.

    In a Hydra multirun the error is logged and re-raised instead: Hydra then records that
    one job as failed and runs the others, where `sys.exit` would end the whole sweep.

    A run stopped by Ctrl-C after saving a checkpoint exits 130 with the way to resume.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except ConfigError as err:
            if in_multirun():
                log.error("%s", err)
                raise
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"Error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        except TrainingInterrupted as stop:
            print(stop, file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is unknown: use auto, cpu, cuda or cuda:N.") from None
