"""Bad input: the real scripts must fail with one clear paragraph and touch no earlier run.

Each case gets its own copy of an earlier run under its own `paths.log_dir`, runs the script
there, and checks the exit code, the key words of the message, that no traceback is shown, and
that every file of the earlier run is unchanged. The cases run a few at a time, so their
interpreter start-ups overlap.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TIKTOKEN_CACHE, TINY_RUN, run_script
from gptlab.data.corpus import check_utf8
from gptlab.errors import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_HYDRA_ERROR = 1
QUICK_RUN = tuple(o for o in TINY_RUN if not o.startswith(("trainer.max_steps", "trainer.val_")))
EARLIER_RUN = Path("2026-11-22") / "00-00-00"
LATIN1_BYTES = ("Le café au lait, s'il vous plaît.\n" * 20).encode("latin-1")
LATIN1_OFFSET = LATIN1_BYTES.index("é".encode("latin-1"))


@dataclass(frozen=True)
class Case:
    """One bad input: script arguments (given the case's folders), expected exit and words."""

    args: Callable[[Path, Path], list[str]]  # (case folder, its copy of the earlier run)
    exit_code: int
    words: Callable[[Path, Path], list[str]]
    script: str = "train.py"
    needs: Path | None = None  # skipped when this path is missing
    resumes_earlier_run: bool = False
    prepare: Callable[[Path], object] | None = None  # applied to the earlier run's copy
    env: dict[str, str | None] | None = None  # changes to the environment (None: unset)
    without_gpu: bool = False  # a case about having no GPU, skipped where there is one


def text_file(case_dir: Path, name: str, content: bytes) -> str:
    path = case_dir / name
    path.write_bytes(content)
    return str(path)


def truncate_last_checkpoint(earlier: Path) -> None:
    last = earlier / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


CASES: dict[str, Case] = {
    "01-emb_dim-not-divisible-by-n_heads": Case(
        lambda d, e: ["model.n_heads=3"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["model.emb_dim=32", "model.n_heads=3", "not divisible"],
    ),
    "02-context_length-below-1": Case(
        lambda d, e: ["model.context_length=0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["model.context_length=0", "positive integer"],
    ),
    "03-lr-not-positive": Case(
        lambda d, e: ["optimizer.lr=-0.001"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["optimizer.lr=-0.001", "must be positive"],
    ),
    "04-batch_size-0": Case(
        lambda d, e: ["data.batch_size=0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["data.batch_size=0", "whole number >= 1"],
    ),
    "05-train_ratio-outside-0-1": Case(
        lambda d, e: ["data.train_ratio=1.5"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["data.train_ratio=1.5", "e.g. 0.9"],
    ),
    "06-stride-0": Case(
        lambda d, e: ["data.stride=0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["data.stride=0", "whole number >= 1"],
    ),
    "07-missing-data-file": Case(
        lambda d, e: ["data=text_files", f"data.path={d / 'missing.txt'}"],
        EXIT_CONFIG_ERROR,
        lambda d, e: [f"data.path='{d / 'missing.txt'}'", "matches no file"],
    ),
    "08-empty-data-file": Case(
        lambda d, e: ["data=text_files", f"data.path={text_file(d, 'empty.txt', b'')}"],
        EXIT_CONFIG_ERROR,
        lambda d, e: [str(d / "empty.txt"), "is empty"],
    ),
    "09-corpus-too-short-for-a-val-window": Case(
        lambda d, e: [
            "data=text_files",
            f"data.path={text_file(d, 'short.txt', b'abcdefghij' * 30)}",
        ],
        EXIT_CONFIG_ERROR,
        lambda d, e: [
            "The val split has 30 tokens",
            "context_length + 1 = 33",
            "model.context_length",
        ],
    ),
    "10-non-utf8-bytes": Case(
        lambda d, e: [
            "data=text_files",
            f"data.path={text_file(d, 'latin1.txt', LATIN1_BYTES)}",
        ],
        EXIT_CONFIG_ERROR,
        lambda d, e: [
            f"{d / 'latin1.txt'} is not UTF-8",
            f"byte {LATIN1_OFFSET} is b'\\xe9'",
            "iconv",
        ],
    ),
    "11-vocab_size-not-matching-tokenizer": Case(
        lambda d, e: ["model.tokenizer=gpt2", "model.vocab_size=50000"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["model.vocab_size=50000", "50257"],
        needs=TIKTOKEN_CACHE,
    ),
    "12-unknown-config-group-option": Case(
        lambda d, e: ["model=gpt7"],
        EXIT_HYDRA_ERROR,
        lambda d, e: ["Could not find 'model/gpt7'", "Available options in 'model'", "tiny"],
    ),
    "13-truncated-resume-checkpoint": Case(
        lambda d, e: [f"resume={e}"],
        EXIT_CONFIG_ERROR,
        lambda d, e: [str(e / "checkpoints" / "last.ckpt"), "corrupt or truncated", "best-"],
        resumes_earlier_run=True,
        prepare=truncate_last_checkpoint,
    ),
    "14-resume-checkpoint-of-another-shape": Case(
        lambda d, e: [f"ckpt_path={e / 'checkpoints' / 'last.ckpt'}", "model.emb_dim=64"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["model.emb_dim=32", "model.emb_dim=64", "start a new run"],
        resumes_earlier_run=True,
    ),
    "15-generate-from-missing-checkpoint": Case(
        lambda d, e: [f"ckpt={d / 'missing.ckpt'}"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["missing.ckpt"],
        script="generate.py",
        needs=REPO_ROOT / "scripts" / "generate.py",
    ),
    "16-evaluate-on-empty-file": Case(
        lambda d, e: [
            f"ckpt={e / 'checkpoints' / 'last.ckpt'}",
            f"text_file={text_file(d, 'empty.txt', b'')}",
        ],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["empty.txt", "empty"],
        script="evaluate.py",
        needs=REPO_ROOT / "scripts" / "evaluate.py",
    ),
    "17-batch_size-not-a-number": Case(
        lambda d, e: ["data.batch_size=abc"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["data.batch_size='abc'", "whole number"],
    ),
    "18-max_steps-not-a-number": Case(
        lambda d, e: ["trainer.max_steps=abc"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.max_steps='abc'", "whole number"],
    ),
    "19-seed-negative": Case(
        lambda d, e: ["seed=-1"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["seed=-1", "from 0 to"],
    ),
    "20-precision-unknown": Case(
        lambda d, e: ["trainer.precision=foo"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.precision='foo'", "bf16-mixed"],
    ),
    "21-gpu-accelerator-without-a-gpu": Case(
        lambda d, e: ["trainer.accelerator=gpu"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.accelerator=gpu", "needs a CUDA GPU", "trainer=cpu"],
        without_gpu=True,
    ),
    "22-val_check_interval-0": Case(
        lambda d, e: ["trainer.val_check_interval=0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.val_check_interval=0", "at least 1"],
    ),
    "23-val_check_interval-float-over-1": Case(
        lambda d, e: ["trainer.val_check_interval=2.0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.val_check_interval=2.0", "fraction of an epoch"],
    ),
    "24-accumulate_grad_batches-0": Case(
        lambda d, e: ["trainer.accumulate_grad_batches=0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.accumulate_grad_batches=0", "whole number >= 1"],
    ),
    "25-generate-on-cuda-without-a-gpu": Case(
        lambda d, e: [f"ckpt={e / 'checkpoints' / 'last.ckpt'}", "device=cuda"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["device=cuda", "needs a CUDA GPU", "device=cpu"],
        script="generate.py",
        without_gpu=True,
    ),
    "26-log_dir-under-a-file": Case(
        lambda d, e: [f"paths.log_dir={text_file(d, 'a-file', b'x')}/runs"],
        EXIT_CONFIG_ERROR,
        lambda d, e: [f"paths.log_dir='{d / 'a-file' / 'runs'}'", "is a file"],
    ),
    "27-hf-dataset-offline": Case(
        lambda d, e: ["data=hf", "data.name=karpathy/tiny_shakespeare"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["karpathy/tiny_shakespeare", "cannot be reached", "data=text_files"],
        # A hub that refuses connections at once, and none of the offline switches.
        env={
            "HF_ENDPOINT": "http://127.0.0.1:9",
            "HF_HUB_OFFLINE": None,
            "HF_DATASETS_OFFLINE": None,
        },
    ),
    "28-gpt2-tokenizer-files-not-cached": Case(
        lambda d, e: ["model=gpt124m"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["vocab.bpe", "TIKTOKEN_CACHE_DIR"],
        # An empty cache, and downloads refused at once (tiktoken sets no timeout of its own).
        env={"TIKTOKEN_CACHE_DIR": "{case}/empty-cache", "HTTPS_PROXY": "http://127.0.0.1:9"},
        prepare=lambda e: (e.parents[2] / "empty-cache").mkdir(),
    ),
    "29-prompt-outside-a-char-vocabulary": Case(
        lambda d, e: [
            "data=text_files",
            f"data.path={text_file(d, 'lower.txt', b'every effort moves you along. ' * 100)}",
        ],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["prompt='Every effort moves you'", "'E'", "prompt='every effort moves you'"],
    ),
    "30-gradient_clip_val-negative": Case(
        lambda d, e: ["trainer.gradient_clip_val=-1"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["trainer.gradient_clip_val=-1", "null for no clipping"],
    ),
    "31-tokens_per_step-0": Case(
        lambda d, e: ["tokens_per_step=0"],
        EXIT_CONFIG_ERROR,
        lambda d, e: ["tokens_per_step=0", "or null"],
    ),
    "32-resume-a-run-that-is-still-training": Case(
        lambda d, e: [f"resume={e}"],
        EXIT_CONFIG_ERROR,
        lambda d, e: [str(e), "is in use by", "start a new run"],
        resumes_earlier_run=True,
        prepare=lambda e: hold_lock(e),
    ),
}
# Case 17 of the first matrix (an invalid value in one sweep trial) is tested with the sweeps.
HELD_LOCKS: list[object] = []


def hold_lock(run_dir: Path) -> None:
    """Hold the run directory's lock, as a run still training would (until the tests end)."""
    import fcntl

    lock = open(run_dir / ".lock", "a+")  # noqa: SIM115 - held open on purpose
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD_LOCKS.append(lock)


def file_states(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: modification time and content hash."""
    return {
        str(path.relative_to(root)): (
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    case_dir: Path
    earlier: Path
    before: dict[str, tuple[int, str]]


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run with best and last checkpoints, as a user's outputs/ would hold."""
    run_dir = tmp_path_factory.mktemp("earlier") / EARLIER_RUN
    result = run_script(
        "train.py",
        *QUICK_RUN,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "max_new_tokens=1",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def outcomes(
    earlier_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Outcome]]]:
    """Start every runnable case, four at a time; each test waits for its own."""

    def run_case(case: Case, case_dir: Path) -> Outcome:
        earlier = case_dir / "outputs" / EARLIER_RUN
        shutil.copytree(earlier_run, earlier)
        args = case.args(case_dir, earlier)
        if case.script == "train.py":
            args = [*QUICK_RUN, f"paths.log_dir={case_dir / 'outputs'}", *args]
        if case.prepare is not None:
            case.prepare(earlier)
        before = file_states(earlier)
        env = {
            k: v.replace("{case}", str(case_dir)) if v else v for k, v in (case.env or {}).items()
        }
        result = run_script(case.script, *args, cwd=case_dir, timeout=600, env=env)
        return Outcome(result, case_dir, earlier, before)

    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {}
        for name, case in CASES.items():
            if runnable(case):
                (root / name).mkdir()
                futures[name] = pool.submit(run_case, case, root / name)
        yield futures


def runnable(case: Case) -> bool:
    if case.without_gpu and torch.cuda.is_available():
        return False
    return case.needs is None or case.needs.exists()


def case_params() -> list:
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                not runnable(case),
                reason="this machine has a GPU"
                if case.without_gpu
                else f"{case.needs} does not exist (yet)",
            ),
        )
        for name, case in CASES.items()
    ]


@pytest.mark.slow  # one script start-up per case: about two CPU-minutes for the matrix
@pytest.mark.parametrize("name", case_params())
def test_bad_input_fails_with_a_clear_message(
    name: str, outcomes: dict[str, Future[Outcome]]
) -> None:
    case = CASES[name]
    outcome = outcomes[name].result()
    result, case_dir, earlier = outcome.result, outcome.case_dir, outcome.earlier
    output = result.stdout + result.stderr
    assert result.returncode == case.exit_code, output[-3000:]
    for word in case.words(case_dir, earlier):
        assert word.lower() in result.stderr.lower(), f"{word!r} not in: {result.stderr[-2000:]}"
    assert "Traceback" not in output
    after = file_states(earlier)
    # The lock file names the process that last held the directory: a resume attempt holds it.
    changed = [
        path
        for path, state in outcome.before.items()
        if after.get(path) != state and not (case.resumes_earlier_run and path == ".lock")
    ]
    assert not changed, f"the earlier run's files changed: {changed}"
    added = sorted(set(after) - set(outcome.before))
    if case.resumes_earlier_run:
        # A resume records its own config next to the run's first one, never over it, and
        # takes the run directory's lock.
        added = [p for p in added if not p.startswith(".hydra/resume-") and p != ".lock"]
    assert not added, f"files were added to the earlier run: {added}"


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1 << 20])
def test_utf8_check_reports_the_byte_offset_across_chunk_boundaries(
    tmp_path: Path, chunk_size: int
) -> None:
    good = tmp_path / "good.txt"
    good.write_text("naïve café — 日本語\n" * 50, encoding="utf-8")
    check_utf8(str(good), chunk_size)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("日本語".encode() + LATIN1_BYTES)
    offset = len("日本語".encode()) + LATIN1_OFFSET
    with pytest.raises(ConfigError, match=rf"bad\.txt is not UTF-8 text: byte {offset} "):
        check_utf8(str(bad), chunk_size)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("abc日".encode()[:-1])
    with pytest.raises(ConfigError, match="ends inside a character at byte 3"):
        check_utf8(str(cut), chunk_size)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux's /proc")
def test_a_file_that_cannot_be_read_is_named() -> None:
    # Reading /proc/self/mem at offset 0 fails with EIO, for root as for anyone.
    with pytest.raises(ConfigError, match=r"/proc/self/mem cannot be read \(Input/output error\)"):
        check_utf8("/proc/self/mem")
