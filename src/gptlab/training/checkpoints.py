"""Checkpoint files: where a run keeps them, how they are written, found, read and matched.

A run directory keeps its checkpoints in `checkpoints/`: `last.ckpt`, the run's latest state,
and `best-step<N>-val_loss<L>.ckpt`, the best by val loss. Every write goes through
`AtomicCheckpointIO`, so a kill or a full disk at any moment leaves the previous file whole.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from gptlab.atomic import atomic_write, link_replacing
from gptlab.checks import check_count
from gptlab.errors import ConfigError
from gptlab.jobs import SWEEP_FILE
from gptlab.model.gpt import GPTConfig
from gptlab.model.pretrained import read_failure
from gptlab.model.tokenizers import Tokenizer
from gptlab.training.records import read_run_record
from gptlab.training.steps import optimizer_stepped, validates_after_step

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_SUFFIX = ".ckpt"
# The checkpoint's entry for the ids of the MLflow and W&B runs the training logs to.
LOGGER_RUNS = "logger_runs"

# Which model settings a checkpoint and a run may disagree on. What the weights compute must
# always match; how they are laid out only when the state is restored as is (resume), since
# init_from crops, pads and ties them; how they were first drawn or are regularised, never.
ARCHITECTURE_FIELDS = (
    *("arch", "vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias"),
    *("pos_emb", "rope_base", "norm", "qk_norm", "mlp", "gelu_approximate", "mlp_hidden"),
    *("bias", "logit_softcap"),
)
LAYOUT_FIELDS = ("context_length", "tie_weights", "pad_vocab_multiple")
TRAINING_ONLY_FIELDS = ("drop_rate", "init", "zero_init_proj")


def fields_that_must_match(adapting_layout: bool) -> tuple[str, ...]:
    """GPTConfig fields a checkpoint must share with the run that loads it."""
    return ARCHITECTURE_FIELDS if adapting_layout else ARCHITECTURE_FIELDS + LAYOUT_FIELDS


def last_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with the file replaced atomically in its own directory.

    Lightning's own writer stages the file in the system temp dir and copies it over the
    target when that is on another filesystem, truncating the old checkpoint first.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        if "://" in str(path):  # a remote filesystem: fsspec's transaction, as Lightning does
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Serialised straight into the file, not through a copy in memory as Lightning does,
        # which holds the whole checkpoint twice and takes a third longer.
        atomic_write(path, lambda f: save_into(checkpoint, f))


def save_into(checkpoint: dict[str, Any], file: BinaryIO) -> None:
    """torch.save into an open file; a failed write (a full disk) raises its own OSError.

    torch's zip writer, closing after the failed write, raises a RuntimeError of its own
    ("unexpected pos") in its place, with the OSError as its context.
    """
    try:
        torch.save(checkpoint, file)
    except RuntimeError as err:
        if isinstance(err.__context__, OSError):
            raise err.__context__ from None
        raise


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints: the best by val loss, and `last.ckpt`.

    `last.ckpt` is written every `every_n_steps` optimizer steps, after each validation, when
    training ends, and by `save_last_now` (an interrupt), so a kill loses at most
    `every_n_steps` steps. Lightning's own step-triggered saves wait for the monitored metric,
    so the step saves are made here. Each step's state is written once: a step save is left
    to the validation that follows it, and after a validation that saved a new best,
    `last.ckpt` is a hard link to that file. A run directory moved since the checkpoint was
    written keeps its best score and paths, rebased to where the directory now is.
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = 100, **kwargs: Any) -> None:
        # Lightning's own last.ckpt follows a validation only when it saved a new best.
        super().__init__(dirpath=dirpath, save_last=False, enable_version_counter=False, **kwargs)
        if every_n_steps is not None:
            check_count(
                "callbacks.checkpoint.every_n_steps",
                every_n_steps,
                1,
                ", or null to save last.ckpt only after validations and at the end",
            )
        self.every_n_steps = every_n_steps
        self._saved_step: int | None = None

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / LAST_CHECKPOINT

    def save_last_now(self, trainer: L.Trainer) -> Path:
        """Write `last.ckpt` for the optimizer step just taken (once per step)."""
        if self._saved_step != trainer.global_step:
            self._write_last(trainer)
        return self.last_path

    def _write_last(self, trainer: L.Trainer, same_as: Path | None = None) -> None:
        """`last.ckpt` for this step, linked to `same_as` (a checkpoint of this very step) where
        the filesystem has hard links. Every rank takes part: saving gathers sharded state."""
        linked = False
        if same_as is not None:
            linked = trainer.strategy.broadcast(
                trainer.is_global_zero and link_replacing(same_as, self.last_path)
            )
        if not linked:
            trainer.save_checkpoint(self.last_path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (
            self.every_n_steps
            and optimizer_stepped(trainer, batch_idx)
            and trainer.global_step % self.every_n_steps == 0
            and not validates_after_step(trainer)
        ):
            self.save_last_now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        best = self.best_model_path
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or trainer.state.fn != "fit" or trainer.fast_dev_run:
            return
        new_best = self.best_model_path if self.best_model_path != best else None
        self._write_last(trainer, same_as=Path(new_best) if new_best else None)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if trainer.strategy.broadcast(saved_step(self.last_path) != trainer.global_step):
            self._write_last(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        if saved_dir and self.dirpath and Path(saved_dir) != Path(self.dirpath):
            state_dict = rebased_paths(state_dict, Path(saved_dir), Path(self.dirpath))
        super().load_state_dict(state_dict)


def rebased_paths(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """ModelCheckpoint's state with every path under `old` moved under `new`."""

    def move(path: Any) -> Any:
        if not path:
            return path
        try:
            return str(new / Path(path).relative_to(old))
        except ValueError:
            return path

    state = dict(state, dirpath=str(new))
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = move(state[key])
    if "best_k_models" in state:
        state["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return state


def read_checkpoint(path: Path, what: str, instead: str) -> dict[str, Any]:
    """A gptlab checkpoint, memory-mapped on the CPU: the one reader that resuming, generate,
    evaluate and init_from share. A corrupt, cut-off or foreign file is one paragraph naming
    `what` was given and what to do `instead`."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ConfigError(
            f"{what} could not be read as a checkpoint ({read_failure(err)}): it is corrupt or "
            f"truncated, e.g. copied or cut off before it was complete; {instead}"
        ) from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if (
        "state_dict" not in checkpoint
        or "model" not in hparams
        or "name" not in hparams.get("tokenizer", {})
    ):
        raise ConfigError(
            f"{what} is not a gptlab checkpoint: it lacks the state_dict and the model and "
            f"tokenizer settings (hyper_parameters) that scripts/train.py saves; {instead}"
        )
    return checkpoint


def saved_step(path: Path) -> int | None:
    """The optimizer step a checkpoint was saved at, or None when there is none."""
    if not Path(path).is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def find_last_checkpoint(log_dir: str | Path, choice: str = "last") -> Path:
    """The most recently written `last.ckpt` under `log_dir` (Hydra's `outputs/` by default);
    `choice` is the `ckpt=` value that asked, for the message when there is none."""
    candidates = list(Path(log_dir).glob(f"**/{LAST_CHECKPOINT}"))
    if not candidates:
        raise ConfigError(
            f"ckpt={choice} found no {LAST_CHECKPOINT} under {Path(log_dir).resolve()}: train "
            f"a model first (python scripts/train.py), or give ckpt=<path to a .ckpt>."
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)


def find_best_checkpoint(log_dir: str | Path) -> Path:
    """`ckpt=best`: the best checkpoint by val loss of the newest run under `log_dir`, or, when
    that run is a sweep's job, of the whole sweep (its summary's winner)."""
    run_dir = find_last_checkpoint(log_dir, "best").parent.parent
    runs = [run_dir]
    if (run_dir.parent / SWEEP_FILE).is_file():
        runs = [job for job in run_dir.parent.iterdir() if last_checkpoint(job).is_file()]
    scored = [(read_run_record(run).best_val_loss, run) for run in runs]
    for _, run in sorted((s for s in scored if s[0] is not None), key=lambda s: s[0]):
        best = best_checkpoint_of(run)
        if best is not None:
            return best
    raise ConfigError(
        f"ckpt=best found no best checkpoint in {run_dir}: its run has not validated yet. "
        f"Use ckpt=last, or ckpt=<path to a .ckpt>."
    )


def best_checkpoint_of(run_dir: Path) -> Path | None:
    """The best checkpoint a run's `last.ckpt` names (in this folder, should the run have
    moved), if it is there."""
    last = last_checkpoint(run_dir)
    saved = read_checkpoint(last, f"ckpt=best: {last}", "use ckpt=<path to a .ckpt> instead.")
    for state in saved.get("callbacks", {}).values():
        named = state.get("best_model_path") if isinstance(state, dict) else None
        if named and (run_dir / CHECKPOINT_DIR / Path(named).name).is_file():
            return run_dir / CHECKPOINT_DIR / Path(named).name
    return None


def checkpoint_to_resume(resume: str | None, ckpt_path: str | None) -> str | None:
    """The checkpoint `resume=<run dir>` or `ckpt_path=<file>` names; errors say how to fix them."""
    if resume and ckpt_path:
        raise ConfigError(
            f"resume={resume!r} and ckpt_path={ckpt_path!r} are both set: give only one "
            f"(resume=<run dir> continues from <run dir>/{CHECKPOINT_DIR}/{LAST_CHECKPOINT})."
        )
    if resume:
        run_dir = Path(resume).expanduser()
        if not run_dir.is_dir():
            raise ConfigError(
                f"resume={resume!r} is not a directory: give the run directory that holds "
                f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}, e.g. resume=outputs/2026-11-22/10-00-00."
            )
        if not last_checkpoint(run_dir).is_file():
            raise ConfigError(
                f"resume={resume!r} has no {CHECKPOINT_DIR}/{LAST_CHECKPOINT}: the run saved no "
                f"checkpoint yet; start a new run, or pass ckpt_path=<file> for another checkpoint."
            )
        return str(last_checkpoint(run_dir))
    if ckpt_path:
        if not Path(ckpt_path).expanduser().is_file():
            raise ConfigError(
                f"ckpt_path={ckpt_path!r} is not a file: give a .ckpt to resume, e.g. "
                f"ckpt_path=<run dir>/{CHECKPOINT_DIR}/{LAST_CHECKPOINT}, or resume=<run dir>."
            )
        return str(Path(ckpt_path).expanduser())
    return None


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """What a gptlab checkpoint says about the run that wrote it, read without its tensors."""

    path: Path
    model: dict[str, Any]
    tokenizer: dict[str, Any]
    hyper_parameters: dict[str, Any]
    # The MLflow and W&B runs it logged to, by logger (`mlflow`, `wandb`), to continue.
    logger_runs: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> SavedRun:
        """Read once; a corrupt or foreign file says which others to resume from."""
        path = Path(path)
        checkpoint = read_checkpoint(path, f"Checkpoint {path}", other_checkpoints(path))
        hparams = checkpoint["hyper_parameters"]
        runs = checkpoint.get(LOGGER_RUNS, {})
        return cls(path, hparams["model"], hparams["tokenizer"], hparams, runs)

    def check_fits(self, model: dict[str, Any], tokenizer: str) -> None:
        """The config asks for the model this checkpoint holds (resume: layout included)."""
        wanted = {"tokenizer": tokenizer, **model}
        # A checkpoint from before a setting existed was trained with its default.
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(GPTConfig)
            if f.default is not dataclasses.MISSING
        }
        saved = {"tokenizer": self.tokenizer["name"], **defaults, **self.model}
        for key in ("tokenizer", *fields_that_must_match(adapting_layout=False)):
            following = key == "vocab_size" and wanted.get(key) is None  # the tokenizer's
            if following or key not in wanted or key not in saved or saved[key] == wanted[key]:
                continue
            raise ConfigError(
                f"Checkpoint {self.path} was trained with model.{key}={saved[key]!r}, but the "
                f"config has model.{key}={wanted[key]!r}: resume with the checkpoint's model "
                f"settings (model.{key}={saved[key]!r}), or start a new run without "
                f"ckpt_path/resume."
            )

    def check_optimizer(self, name: str) -> None:
        """The config's optimizer is the one whose state the checkpoint holds."""
        saved = self.hyper_parameters.get("optimizer", {}).get("name", "adamw")
        if saved != name:
            raise ConfigError(
                f"Checkpoint {self.path} was trained with optimizer={saved}, but the config has "
                f"optimizer={name}: its saved state fits only its own optimizer. Resume with "
                f"optimizer={saved}, or start a new run from its weights with "
                f"init_from={self.path}."
            )

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """A char vocabulary is rebuilt from the corpus on resume; it must be the saved one."""
        if self.tokenizer != tokenizer.to_dict():
            raise ConfigError(
                f"Checkpoint {self.path} was trained with a {self.tokenizer['name']} tokenizer of "
                f"{len(self.tokenizer.get('chars', '')) or 'another'} tokens built from its "
                f"corpus, but this run's data gives a different {tokenizer.name} vocabulary "
                f"({tokenizer.vocab_size} tokens), so token ids would mean other characters: "
                f"resume with the data settings of the original run."
            )


def other_checkpoints(path: Path) -> str:
    """What to do instead of reading `path`: the other checkpoints beside it, if any."""
    others = sorted(p.name for p in path.parent.glob(f"*{CHECKPOINT_SUFFIX}") if p != path)
    there = f" (there: {', '.join(others)})" if others else ""
    return f"resume from another checkpoint with ckpt_path=<file>{there}, or start a new run."


def check_weights_fit(config: GPTConfig, weights: GPTConfig, source: str) -> None:
    """`init_from` weights must compute what this run's model computes; layout may differ."""
    for name in fields_that_must_match(adapting_layout=True):
        ours, theirs = getattr(config, name), getattr(weights, name)
        if ours != theirs:
            raise ConfigError(
                f"init_from={source!r} has {name}={theirs!r}, but model.{name}={ours!r}: set "
                f"model.{name}={theirs!r} (for OpenAI's weights, pick the matching model=gpt2, "
                f"gpt2-medium, gpt2-large or gpt2-xl)."
            )
