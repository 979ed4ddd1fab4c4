"""scripts/evaluate.py on a checkpoint trained here: the numbers it prints, and its table."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_RUN, make_datamodule, run_script
from gptlab.errors import ConfigError
from gptlab.inference.evaluation import check_evaluate_config
from gptlab.inference.loading import load_checkpoint
from gptlab.training.module import next_token_loss


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script("train.py", *TINY_RUN, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def reported(output: str, name: str) -> float:
    match = re.search(rf"^{name}:\s+([\d.,]+)", output, flags=re.MULTILINE)
    assert match, f"no {name} line in:\n{output}"
    return float(match.group(1).replace(",", ""))


def test_val_split_scores_match_training_validation(ckpt: Path) -> None:
    # A 2% val split keeps the test quick; the windows are still training's.
    result = run_script(
        "evaluate.py", f"ckpt={ckpt}", "data=pydocs", "data.train_ratio=0.98", "split=val"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module = load_checkpoint(ckpt)
    datamodule = make_datamodule(
        source="pydocs", tokenizer="char", context_length=32, train_ratio=0.98
    )
    datamodule.setup("fit")
    loss_sum, correct, tokens = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in datamodule.val_dataloader():
            logits = module(inputs)
            loss_sum += next_token_loss(logits, targets).item() * targets.numel()
            correct += (logits.argmax(-1) == targets).sum().item()
            tokens += targets.numel()
    assert reported(result.stdout, "Scored") == tokens
    assert reported(result.stdout, "Loss") == pytest.approx(loss_sum / tokens, abs=1e-4)
    assert reported(result.stdout, "Perplexity") == pytest.approx(
        math.exp(loss_sum / tokens), abs=0.01
    )
    assert reported(result.stdout, "Accuracy") == pytest.approx(100 * correct / tokens, abs=0.01)


def test_short_text_file_with_token_table(ckpt: Path, tmp_path: Path) -> None:
    text = "def f(x):\n    return x\n"
    text_file = tmp_path / "snippet.py"
    text_file.write_text(text)
    result = run_script("evaluate.py", f"ckpt={ckpt}", f"text_file={text_file}", "show_tokens=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert reported(result.stdout, "Scored") == len(text) - 1
    row_pattern = r"^\s+(\d+)  ('[^']*')\s+('[^']*')\s+([✓✗])  ('[^']*')\s+(-?[\d.]+)$"
    rows = re.findall(row_pattern, result.stdout, flags=re.MULTILINE)
    assert len(rows) == 4, result.stdout
    for i, (number, context, predicted, mark, target, logprob) in enumerate(rows):
        assert (int(number), context, target) == (i + 1, repr(text[: i + 1]), repr(text[i + 1]))
        assert mark == ("✓" if predicted == target else "✗")
        assert float(logprob) < 0


def test_characters_outside_the_vocabulary_are_named(ckpt: Path, tmp_path: Path) -> None:
    text_file = tmp_path / "unicode.txt"
    text_file.write_text("naïve café")
    result = run_script("evaluate.py", f"ckpt={ckpt}", f"text_file={text_file}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Characters 'éï'" in result.stderr


@pytest.mark.parametrize("key", ["batch_size", "stride"])
def test_a_text_files_loader_settings_are_named_by_their_own_keys(key: str) -> None:
    settings = {"text_file": "notes.txt", "split": "val", "show_tokens": 0}
    cfg = OmegaConf.create({**settings, "batch_size": 8, "stride": None, key: 0})
    with pytest.raises(ConfigError, match=rf"^{key}=0 must be a whole number >= 1"):
        check_evaluate_config(cfg)
