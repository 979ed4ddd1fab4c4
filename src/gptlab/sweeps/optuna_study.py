"""Optuna studies that outlive a process: storage strings, pruners, samplers, stale trials.

Shared by the sweeper (`hydra_plugins.gptlab_optuna_sweeper`), which asks and tells, and by
`gptlab.sweeps.pruning`, which finds the same study and trial again from inside a training job,
whichever process or machine that job runs in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import inspect
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import FrozenTrial, TrialState

from gptlab.errors import ConfigError

DEFAULT_JOURNAL = "optuna.journal"
# How every record of an Optuna journal starts (one JSON object a line).
JOURNAL_RECORD_START = b'{"op_code":'
JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIXES = (".journal", ".log")
# A trial's last sign of life (seconds since the epoch), set by the sweep that runs it.
HEARTBEAT_ATTR = "gptlab:heartbeat"
# The sweeper sets this in each job's environment (hydra.job.env_set) to the job's trial.
TRIAL_ENV = "GPTLAB_OPTUNA_TRIAL"
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclasses.dataclass(frozen=True)
class StorageSpec:
    """Where a study lives: a journal file (`path`) or a database (`url`)."""

    path: Path | None = None
    url: str | None = None

    @property
    def lock_path(self) -> Path | None:
        """A file that workers lock while they count and ask trials, where there is one.

        Not `<journal>.lock`: Optuna's journal takes that name for its own lock.
        """
        if self.path is not None:
            return self.path.with_name(self.path.name + ".ask-lock")
        if self.url is not None and self.url.startswith("sqlite:///"):
            database = Path(self.url.removeprefix("sqlite:///"))
            return database.with_name(database.name + ".ask-lock")
        return None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else str(self.url)


def parse_storage(storage: str | None, sweep_dir: str | Path) -> StorageSpec:
    """`hydra.sweeper.storage` as a journal file or a database URL.

    null: `<sweep dir>/optuna.journal`, so every study can be opened and resumed later.
    A URL (`sqlite:///study.db`, `postgresql://...`): Optuna's RDB storage.
    `journal:<path>`, or a path ending in .journal or .log: a journal file, which many
    workers can share, also on NFS. Relative paths are taken from the current directory.
    """
    if storage is None or str(storage).strip() == "":
        return StorageSpec(path=Path(sweep_dir).absolute() / DEFAULT_JOURNAL)
    storage = str(storage)
    if storage.startswith(JOURNAL_PREFIX):
        return StorageSpec(path=Path(storage.removeprefix(JOURNAL_PREFIX)).absolute())
    if "://" in storage:
        if storage in ("sqlite://", "sqlite:///:memory:"):
            raise ConfigError(
                f"hydra.sweeper.storage={storage} is an in-memory database, which the trials "
                f"cannot find again from their own jobs: use a file such as "
                f"sqlite:///optuna.db, or leave storage null for a journal in the sweep dir."
            )
        return StorageSpec(url=storage)
    if storage.endswith(JOURNAL_SUFFIXES):
        return StorageSpec(path=Path(storage).absolute())
    raise ConfigError(
        f"hydra.sweeper.storage={storage!r} is neither a database URL nor a journal file: use "
        f"e.g. sqlite:///optuna.db, a path ending in .journal (or journal:<path>), or null for "
        f"a journal file in the sweep directory."
    )


def open_storage(spec: StorageSpec) -> BaseStorage:
    """The study's storage; a file that holds no study Optuna can read is a ConfigError
    naming it (Optuna's own errors name neither the file nor a way out)."""
    if spec.path is not None:
        spec.path.parent.mkdir(parents=True, exist_ok=True)
        check_journal(spec.path)
        return JournalStorage(JournalFileBackend(str(spec.path)))
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return RDBStorage(str(spec.url))
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise ConfigError(
            f"hydra.sweeper.storage={spec.url} cannot be opened as an Optuna study database "
            f"({reason}). Give the URL of a database an Optuna sweep wrote (a sqlite:/// file "
            f"that does not exist yet starts a new one), or move the file away."
        ) from None


def check_journal(path: Path) -> None:
    """`path` must be an Optuna journal: one JSON record a line, the last one whole.

    Checked under Optuna's own journal lock, so that a record another worker is appending is
    not taken for a cut one. A record cut short (what a writer that crashed or ran out of
    disk leaves) is refused rather than read past as Optuna does: the next record appended to
    it would make the journal unreadable for good.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        whole = 0  # bytes of whole records so far
        with path.open("rb") as journal:
            for number, line in enumerate(journal, start=1):
                cut = not line.endswith(b"\n") and (
                    line.startswith(JOURNAL_RECORD_START) or JOURNAL_RECORD_START.startswith(line)
                )
                if cut:
                    raise ConfigError(
                        f"The Optuna journal {path} ends in a record cut short (line {number}, "
                        f"from byte {whole}), as a sweep that crashed or ran out of disk while "
                        f"writing it leaves it. Drop the cut record, keeping the {number - 1} "
                        f"whole ones, with `truncate -s {whole} {path}` (while no sweep uses the "
                        f"journal), then run the sweep again."
                    )
                if not is_journal_record(line):
                    raise ConfigError(
                        f"{path} is not an Optuna journal: line {number} is not a journal "
                        f"record. Give hydra.sweeper.storage a journal that a sweep wrote, or a "
                        f"file name that does not exist yet for a new study (or move {path} "
                        f"away)."
                    )
                whole += len(line)
    finally:
        lock.release()


def is_journal_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return False
    return isinstance(record, dict) and "op_code" in record


def make_pruner(name: str, args: dict[str, Any] | None = None) -> optuna.pruners.BasePruner:
    """Optuna's pruner for `hydra.sweeper.pruner`, built with `hydra.sweeper.pruner_args`."""
    if name not in PRUNERS:
        raise ConfigError(
            f"hydra.sweeper.pruner={name!r} is unknown: use one of {', '.join(PRUNERS)}."
        )
    cls = PRUNERS[name]
    args = dict(args or {})
    accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "kwargs")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ConfigError(
            f"hydra.sweeper.pruner_args.{unknown[0]} is not an argument of {cls.__name__} "
            f"(pruner={name}): use "
            + (", ".join(accepted) if accepted else "none (pruner_args={})")
            + "."
        )
    return cls(**args)


def hyperband_in_steps(
    args: dict[str, Any], first_validation: int | None, max_steps: int
) -> dict[str, Any]:
    """Hyperband's `pruner_args` with its resource bounds, in optimizer steps, filled in.

    Optuna's defaults (min_resource 1, max_resource from the first finished trial) split a
    1,000-step search into 7 brackets whose trials are never compared with each other's; the
    first validation and the run's length give one rung per validation that can prune.
    """
    args = dict(args)
    if "min_resource" not in args:
        if first_validation is None:
            raise ConfigError(
                "hydra.sweeper.pruner=hyperband takes its first rung from the first validation, "
                "but trainer.val_check_interval is a fraction of an epoch: validate every N "
                "steps (e.g. trainer.val_check_interval=100) or give the rung in steps, "
                "+hydra.sweeper.pruner_args.min_resource=100."
            )
        args["min_resource"] = first_validation
    if "max_resource" not in args and max_steps > 0:
        args["max_resource"] = max_steps
    return args


def make_sampler(
    seed: int | None, offset: int, n_startup_trials: int
) -> optuna.samplers.TPESampler:
    """TPE seeded with `seed + offset`, the number of the trial it will sample.

    A sampler per trial, so that a resumed study or a second worker does not repeat the
    random draws of trials that are already in the study.
    """
    return optuna.samplers.TPESampler(
        seed=None if seed is None else seed + offset, n_startup_trials=n_startup_trials
    )


def find_trial(study: optuna.Study, storage: BaseStorage, number: int) -> optuna.Trial:
    """Trial `number` of `study`, to report to from a job that did not ask for it."""
    return optuna.Trial(study, trial_id(storage, study.study_name, number))


def trial_id(storage: BaseStorage, study_name: str, number: int) -> int:
    """The storage's id of trial `number`, through its public API (not `Trial._trial_id`)."""
    study_id = storage.get_study_id_from_name(study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


@contextlib.contextmanager
def exclusive(lock_path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (none for a remote database).

    Workers count the study's trials and ask for new ones under this lock, so that together
    they start exactly n_trials. The kernel drops the lock if the worker dies.
    """
    if lock_path is None:
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def last_alive(trial: FrozenTrial) -> float:
    beat = trial.system_attrs.get(HEARTBEAT_ATTR)
    if beat is not None:
        return float(beat)
    return trial.datetime_start.timestamp() if trial.datetime_start else time.time()


def fail_stale_trials(study: optuna.Study, storage: BaseStorage, stale_after_s: float) -> list[int]:
    """Mark FAIL the running trials whose sweep has not shown a sign of life for a while.

    Those are trials of a sweep that was killed: no process will ever tell their result.
    Optuna's own heartbeat covers only database storages; this one works for journals too.
    """
    now = time.time()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        silent = now - last_alive(trial)
        if silent <= stale_after_s:
            continue
        try:
            storage.set_trial_user_attr(
                trial_id(storage, study.study_name, trial.number),
                "fail_reason",
                f"no heartbeat for {silent:.0f} s: the sweep running it was stopped",
            )
            study.tell(trial.number, state=TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            continue  # another worker failed it first
        failed.append(trial.number)
    return failed


@contextlib.contextmanager
def heartbeat(storage: BaseStorage, trial_ids: Sequence[int], interval_s: float) -> Iterator[None]:
    """Record a sign of life for `trial_ids` every `interval_s` while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            for storage_id in trial_ids:
                # The trial may have finished (or been failed by another worker) meanwhile.
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
                    storage.set_trial_system_attr(storage_id, HEARTBEAT_ATTR, time.time())
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def count_states(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    counts = {state.name.lower(): 0 for state in (*FINISHED, TrialState.RUNNING)}
    for trial in trials:
        key = trial.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    return counts
