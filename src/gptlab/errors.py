"""Errors that end a run with a message of their own, as opposed to bugs (which keep their stack).

Scripts print these as one paragraph without a traceback and exit with `exit_code`, so each
message must say what happened and what to do next.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

EXIT_CONFIG_ERROR = 2
EXIT_STORAGE_ERROR = 1


class ConfigError(ValueError):
    """A bad setting or input, reported with the offending value and how to fix it."""

    exit_code = EXIT_CONFIG_ERROR


class NonFiniteLossError(ConfigError):
    """Training diverged (a nan or inf loss). Settings such as the learning rate are the usual
    cause, so it is reported like a bad setting: one paragraph, no traceback."""


class StorageError(Exception):
    """A file the run must write could not be written (a full disk, a quota, a lost mount)."""

    exit_code = EXIT_STORAGE_ERROR


def exit_with_message(err: ConfigError | StorageError) -> NoReturn:
    """End the process with the error's paragraph and code; `HYDRA_FULL_ERROR=1` shows the
    stack instead, as Hydra's own errors do."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    print(f"Error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class TrainingInterrupted(Exception):
    """A signal stopped training after an optimizer step, which `last.ckpt` then holds.

    `checkpoint` and `requeued` are filled in once the checkpoint is written (and the SLURM
    job requeued); `resume_hint` by the run, which knows its directory.
    """

    def __init__(self, signum: int, step: int | None = None) -> None:
        super().__init__(signum, step)
        self.signum = signum
        self.step = step
        self.checkpoint: Path | None = None
        self.requeued: str | None = None
        self.resume_hint = ""

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        message = f"Interrupted by {signal_name(self.signum)}: saved step {self.step} to "
        message += f"{self.checkpoint}." if self.checkpoint else "no checkpoint."
        if self.requeued:
            message += f" Requeued SLURM job {self.requeued}; it continues this run when it starts."
        return f"{message} {self.resume_hint}".strip()


class TrainingAborted(TrainingInterrupted):
    """A second signal: training stopped at once, without saving."""

    def __str__(self) -> str:
        return (
            f"Aborted by a second {signal_name(self.signum)}, without saving this step. "
            f"{self.resume_hint}"
        ).strip()


class StoppedBeforeTraining(TrainingAborted):
    """A signal before the first training step (during the untrained model's validation, say):
    stopped at once, with nothing new to save."""

    def __str__(self) -> str:
        return f"Stopped by {signal_name(self.signum)} before training started. {self.resume_hint}"
