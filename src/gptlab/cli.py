"""What the scripts share: turning user mistakes into one clear message and an exit code."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from gptlab import resume  # noqa: F401  (registers the resolvers conf/hydra uses)
from gptlab.errors import ConfigError, TrainingInterrupted

T = TypeVar("T")

EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def exit_on_config_error(task: Callable[..., T]) -> Callable[..., T]:
    """Print a ConfigError as its message alone and exit 2; HYDRA_FULL_ERROR=1 shows the stack.

    A run stopped by Ctrl-C after saving a checkpoint exits 130 with the way to resume.
    """

    @functools.wraps(task)
    def wrapper(*args, **kwargs) -> T:
        try:
            return task(*args, **kwargs)
        except ConfigError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"Error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        except TrainingInterrupted as stop:
            print(stop, file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
