"""AdamW settings: checked once, the schedule, the accumulation and when AdamW may be fused."""

from __future__ import annotations

import itertools
import re

import pytest

from gptlab.errors import ConfigError
from gptlab.training.optim import OptimizerSettings


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    settings = OptimizerSettings(lr=1.0, schedule="cosine", warmup_steps=10, min_lr=0.1)
    values = [settings.lr_multiplier(step, total_steps=110) for step in range(120)]
    assert values[0] == pytest.approx(0.1)
    assert values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55)
    assert values[110] == pytest.approx(0.1)
    assert values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))


def test_constant_schedule_stays_at_lr_after_warmup() -> None:
    settings = OptimizerSettings(lr=1e-3, warmup_steps=4)
    assert [settings.lr_multiplier(s, 0) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]


def test_tokens_per_step_sets_accumulation() -> None:
    assert OptimizerSettings(tokens_per_step=524_288).accumulation(16, 1024, 4) == 8
    assert OptimizerSettings(tokens_per_step=4096).accumulation(8, 256, 2) == 1
    assert OptimizerSettings().accumulation(8, 256, 2) is None
    with pytest.raises(ConfigError, match="tokens_per_step=5,000 is not a multiple"):
        OptimizerSettings(tokens_per_step=5000).accumulation(8, 256, 1)
    with pytest.raises(ConfigError, match="tokens_per_step"):
        OptimizerSettings(tokens_per_step=1024).accumulation(8, 256, 1)


@pytest.mark.parametrize(
    ("precision", "clipping", "device", "fused"),
    [
        ("bf16-mixed", True, "cuda", True),  # the GPU default: legal, since nothing is scaled
        ("32-true", True, "cuda", True),
        ("16-mixed", False, "cuda", True),
        ("16-mixed", True, "cuda", False),  # the GradScaler must unscale before clipping
        ("bf16-mixed", True, "cpu", True),  # torch's CPU kernel: a third of the unfused time
        ("32-true", True, "cpu", True),
        ("32-true", True, "mps", False),
    ],
)
def test_auto_fuses_adamw_where_clipping_sees_true_gradients(
    precision: str, clipping: bool, device: str, fused: bool
) -> None:
    assert OptimizerSettings().use_fused(device, precision, clipping) is fused


def test_forced_fusing_works_on_cpu_and_is_refused_where_clipping_would_be_wrong() -> None:
    assert OptimizerSettings(fused=True).use_fused("cpu", "bf16-mixed", clipping=True)
    assert not OptimizerSettings(fused=False).use_fused("cuda", "bf16-mixed", clipping=True)
    with pytest.raises(ConfigError, match="16-mixed and gradient clipping"):
        OptimizerSettings(fused=True).check_fused("16-mixed", clipping=True)


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"lr": 0.0}, "optimizer.lr=0.0"),
        ({"lr": "abc"}, "optimizer.lr='abc'"),
        ({"betas": [0.9, 1.5]}, "optimizer.betas=[0.9, 1.5]"),
        ({"weight_decay": -0.1}, "optimizer.weight_decay=-0.1"),
        ({"warmup_steps": 2.5}, "optimizer.warmup_steps=2.5"),
        ({"schedule": "linear"}, "optimizer.schedule='linear'"),
        ({"min_lr": 1.0, "lr": 0.1}, "optimizer.min_lr=1.0"),
        ({"fused": "yes"}, "optimizer.fused='yes'"),
        ({"tokens_per_step": 0}, "tokens_per_step=0"),
        ({"momentum": 0.9}, "optimizer.momentum is not an optimizer setting"),
    ],
)
def test_bad_settings_name_the_key_and_the_value(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        OptimizerSettings.from_mapping(settings)


def test_settings_survive_a_checkpoint_as_plain_values() -> None:
    settings = OptimizerSettings(lr=3e-4, betas=(0.9, 0.95), schedule="cosine", fused=True)
    saved = settings.to_dict()
    assert saved["betas"] == [0.9, 0.95]
    assert OptimizerSettings.of(saved) == settings
    assert OptimizerSettings.of(settings) is settings
