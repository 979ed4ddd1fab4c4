"""Benchmark huge-corpus handling on generated text: tokenising throughput and training memory.

    python scripts/bench_data.py --sizes-mb 10 1000 --num-proc 2 --workdir /tmp/gptlab-bench-data

For each size it generates a corpus of ~1 MB text files (words drawn from CPython's docs),
times `prepare_corpus` (datasets.map, `--num-proc` processes) against a single-process
tiktoken loop over the same files, then trains a small model from the prepared tokens.bin in a fresh
process and reports that process's peak RSS. The work folder is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from gptlab.data.corpus import CorpusSpec, load_pydocs
from gptlab.data.prepared import prepare_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 1 << 20


def generate_corpus(directory: Path, size_mb: int, seed: int = 0) -> int:
    """~`size_mb` MB of text in 1 MB files of words and punctuation; returns the bytes written."""
    words = np.array(sorted(set(re.findall(r"[A-Za-z_]+|[.,:;()]", " ".join(load_pydocs())))))
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(max(1, size_mb)):
        # Words are over 4 bytes with their space: enough to fill the file, cut at a word.
        picked = words[rng.integers(0, len(words), FILE_BYTES // 4)]
        text = " ".join(picked.tolist())[:FILE_BYTES].rsplit(" ", 1)[0]
        (directory / f"part{index:05d}.txt").write_text(text)
        written += len(text)
    return written


def tiktoken_loop(directory: Path) -> tuple[int, float]:
    """Tokens and seconds for the baseline: one process, one file after another."""
    import tiktoken

    encoding = tiktoken.get_encoding("gpt2")
    start = time.perf_counter()
    n_tokens = sum(
        len(encoding.encode_ordinary(path.read_text())) + 1
        for path in sorted(directory.glob("*.txt"))
    )
    return n_tokens, time.perf_counter() - start


def train_peak_rss(prepared: Path, run_dir: Path, steps: int) -> tuple[int, str]:
    """Peak RSS (bytes) of a separate training process reading tokens.bin, and its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), *sys.path])}
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        "model=tiny",
        "model.tokenizer=gpt2",
        "model.context_length=256",
        "data=prepared",
        f"data.dir={prepared}",
        # A small batch keeps the logits' memory small next to what the corpus could add.
        "data.batch_size=2",
        "trainer=cpu",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.limit_val_batches=4",
        "trainer.enable_progress_bar=false",
        "callbacks.progress_bar=null",
        "max_new_tokens=5",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # VmHWM, not wait4's ru_maxrss: that one survives fork+exec, so it would report this
    # (larger) benchmark process's size rather than the training process's own peak.
    peak = 0
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()))
    output: list[str] = []
    reader.start()
    while process.poll() is None:
        peak = max(peak, high_water_mark(process.pid))
        time.sleep(0.1)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"training on {prepared} failed:\n{output[0][-3000:]}")
    return peak, output[0]


def high_water_mark(pid: int) -> int:
    """Peak resident set size of a running process, in bytes (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gptlab-bench-data"))
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora")
    args = parser.parse_args()
    # datasets' Arrow caches of the generated corpora go with the work folder.
    os.environ["HF_DATASETS_CACHE"] = str(args.workdir / "hf-cache")
    print(
        f"{'corpus':>8} {'tokens':>13} {'map MB/s':>9} {'loop MB/s':>10} {'speed-up':>9} "
        f"{'.bin':>9} {'train peak RSS':>15}"
    )
    try:
        for size_mb in args.sizes_mb:
            root = args.workdir / f"{size_mb}mb"
            corpus_bytes = generate_corpus(root / "text", size_mb)
            start = time.perf_counter()
            metadata = prepare_corpus(
                CorpusSpec(source="text_files", path=str(root / "text" / "*.txt")),
                "gpt2",
                root / "prepared",
                args.num_proc,
            )
            map_seconds = time.perf_counter() - start
            loop_tokens, loop_seconds = tiktoken_loop(root / "text")
            if loop_tokens != metadata["n_tokens"]:
                raise RuntimeError(f"{loop_tokens} != {metadata['n_tokens']} tokens")
            rss, _ = train_peak_rss(root / "prepared", root / "run", args.steps)
            bin_mb = (root / "prepared" / "tokens.bin").stat().st_size / 1e6
            corpus_mb = corpus_bytes / 1e6
            print(
                f"{corpus_mb:>6.0f}MB {metadata['n_tokens']:>13,} "
                f"{corpus_mb / map_seconds:>9.2f} {corpus_mb / loop_seconds:>10.2f} "
                f"{loop_seconds / map_seconds:>8.2f}x {bin_mb:>7.0f}MB {rss / 2**20:>11,.0f} MiB",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(root)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print(
        f"map: prepare_corpus with datasets.map(num_proc={args.num_proc}), including the "
        f"Arrow cache and writing tokens.bin; loop: tiktoken encode_ordinary, one process."
    )


if __name__ == "__main__":
    main()
