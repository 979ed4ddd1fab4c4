"""The LightningModule: loss, perplexity, learning-rate schedule and a memorisation check."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import make_datamodule
from gptlab.errors import ConfigError
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.module import GPTLightningModule, model_loss, next_token_loss

TINY_MODEL = {
    "vocab_size": 20,
    "context_length": 8,
    "emb_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
}
ADAMW = {"lr": 4e-4, "weight_decay": 0.1}
ALPHABET = CharTokenizer("abcdefghijklmnopqrst")


def make_module(**model_changes) -> GPTLightningModule:
    return GPTLightningModule({**TINY_MODEL, **model_changes}, ADAMW, ALPHABET.to_dict())


def test_loss_is_the_mean_negative_log_probability_of_the_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 0, 4], [2, 2, 3]])
    log_probs = torch.log(torch.softmax(logits, dim=-1))
    by_hand = -torch.stack(
        [log_probs[b, t, targets[b, t]] for b in range(2) for t in range(3)]
    ).mean()
    loss = next_token_loss(logits, targets)
    torch.testing.assert_close(loss, by_hand)
    assert math.isclose(math.exp(loss.item()), torch.exp(by_hand).item(), rel_tol=1e-6)


def test_untrained_loss_is_near_log_vocab() -> None:
    torch.manual_seed(0)
    module = make_module()
    idx = torch.randint(0, 20, (8, 8))
    loss = next_token_loss(module(idx), torch.randint(0, 20, (8, 8)))
    assert abs(loss.item() - math.log(20)) < 0.5


def test_val_ppl_is_exp_of_the_token_weighted_mean_loss(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(ALPHABET.chars[i % 7 * 3 % 20] for i in range(400)))
    datamodule = make_datamodule(
        source="text_files", path=str(corpus), tokenizer="char", context_length=8, batch_size=3
    )
    datamodule.setup("fit")
    module = GPTLightningModule(
        {**TINY_MODEL, "vocab_size": datamodule.tokenizer.vocab_size},
        ADAMW,
        datamodule.tokenizer.to_dict(),
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    losses = []
    with torch.no_grad():
        for inputs, targets in datamodule.val_dataloader():
            losses.append(
                torch.nn.functional.cross_entropy(
                    module(inputs).flatten(0, 1), targets.flatten(), reduction="none"
                )
            )
    mean = torch.cat(losses).mean().item()
    assert len(losses[-1]) != len(losses[0]), "the last batch should be smaller"
    assert math.isclose(metrics["val/loss"], mean, rel_tol=1e-5)
    assert math.isclose(metrics["val/ppl"], math.exp(mean), rel_tol=1e-5)


def test_tokenizer_and_model_vocab_must_match() -> None:
    with pytest.raises(ConfigError, match="model.vocab_size=21 does not match"):
        make_module(vocab_size=21)


@pytest.mark.parametrize(
    ("change", "words"),
    [({"lr": 0.0}, "optimizer.lr=0.0"), ({"lr": -1e-3}, "optimizer.lr=-0.001")],
)
def test_bad_optimizer_settings_are_refused(change: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        GPTLightningModule(TINY_MODEL, {**ADAMW, **change}, ALPHABET.to_dict())


def test_tiny_model_memorises_a_short_text() -> None:
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog"
    tokenizer = CharTokenizer.from_text(text)
    module = GPTLightningModule(
        {**TINY_MODEL, "vocab_size": tokenizer.vocab_size, "context_length": len(text) - 1},
        ADAMW,
        tokenizer.to_dict(),
    )
    ids = torch.tensor([tokenizer.encode(text)])
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    for _ in range(300):
        loss = next_token_loss(module(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


class CountSaved(torch.autograd.graph.saved_tensors_hooks):
    """Counts the tensors autograd keeps for the backward."""

    def __init__(self) -> None:
        self.count = 0
        super().__init__(self.pack, lambda tensor: tensor)

    def __enter__(self) -> CountSaved:
        super().__enter__()
        return self

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return tensor


def test_activation_checkpointing_recomputes_the_same_loss_and_gradients() -> None:
    model = {"vocab_size": 16, "context_length": 8, "emb_dim": 16, "n_heads": 2, "n_layers": 2}
    inputs = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = GPTLightningModule(
            {**model, "drop_rate": 0.1},  # dropout masks must be drawn again alike
            {"lr": 1e-3},
            CharTokenizer("abcdefghijklmnop").to_dict(),
            activation_checkpointing=checkpointing,
        )
        with CountSaved() as saved:
            loss = model_loss(module.model.train(), inputs, inputs.roll(-1, dims=1))
        loss.backward()
        grads = [p.grad.clone() for p in module.parameters()]
        results.append((loss.detach(), grads, saved.count))
    (loss, grads, kept), (loss_ac, grads_ac, kept_ac) = results
    torch.testing.assert_close(loss_ac, loss)
    for grad, grad_ac in zip(grads, grads_ac, strict=True):
        torch.testing.assert_close(grad_ac, grad)
    assert kept_ac < kept / 2, "the blocks' activations were kept, not recomputed"
