"""A gptlab model as lm-evaluation-harness sees it: text in, log-probabilities and greedy text out.

This module subclasses lm_eval's `LM`, so it imports lm-eval (`pip install -e ".[eval]"`);
`inference.harness` imports it only after checking that lm-eval is there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from torch import nn
from tqdm import tqdm

from gptlab.errors import ConfigError
from gptlab.inference.evaluation import encode_pair, scoring_windows
from gptlab.inference.generation import stream_text, stream_tokens
from gptlab.model.tokenizers import Tokenizer, UnknownCharacters

log = logging.getLogger(__name__)

T = TypeVar("T")

# lm-eval's Hugging Face model generates at most this many tokens unless a task says otherwise.
DEFAULT_MAX_GEN_TOKS = 256


class GPTLabLM(LM):
    """A gptlab model and its tokenizer behind the harness's three requests.

    `loglikelihood` cuts contexts from the left to the model's context length and batches
    `batch_size` windows, longest first; `loglikelihood_rolling` reads a text in disjoint
    windows of the context length after `<|endoftext|>` (a char model has none, so a text's
    first character is not scored); `generate_until` decodes greedily, one request at a time,
    until a stop string, `<|endoftext|>` or the task's `max_gen_toks`.
    """

    def __init__(
        self, model: nn.Module, tokenizer: Tokenizer, batch_size: int = 8, source: str = ""
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.source = source
        self.context_length: int = model.config.context_length
        self.warned_sampling = False

    def get_model_info(self) -> dict[str, Any]:
        """What the harness records in its results' `config`."""
        return {
            "gptlab_model": self.source,
            "context_length": self.context_length,
            "tokenizer": self.tokenizer.name,
        }

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        pairs = [self.task_text(encode_pair, self.tokenizer, *r.args) for r in requests]
        return self.score(
            [(context + continuation, len(context)) for context, continuation in pairs]
        )

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        start = [] if self.tokenizer.eot_id is None else [self.tokenizer.eot_id]
        texts = [start + self.task_text(self.tokenizer.encode, r.args[0]) for r in requests]
        return [logprob for logprob, _ in self.score([(ids, 1) for ids in texts])]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        return [self.generate(context, options) for context, options in (r.args for r in requests)]

    def task_text(self, encode: Callable[..., T], *args: Any) -> T:
        """`encode(*args)`; characters a char model has never seen are a paragraph naming the
        task's text as the cause."""
        try:
            return encode(*args)
        except UnknownCharacters as err:
            raise ConfigError(
                f"The task's text has characters {err.characters!r} that this char model's "
                f"vocabulary lacks (the {self.tokenizer.vocab_size} characters of its training "
                f"corpus), so it cannot score it: evaluate a model with the GPT-2 tokenizer "
                f"(e.g. pretrained=gpt2), or a task of your own written in the corpus's "
                f"characters (include_path=<folder of task YAMLs>)."
            ) from None

    @torch.inference_mode()
    def score(self, sequences: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (ids, first): the summed log-probability of ids[first:] and whether greedy
        decoding picks every one of those tokens.

        The windows of all sequences are batched together, longest first, right-padded: the
        model is causal, so padding after a window never changes its logits.
        """
        rows = [
            (index, ids[start:stop], ids[stop - scored + 1 : stop + 1])
            for index, (ids, first) in enumerate(sequences)
            for start, stop, scored in scoring_windows(len(ids), first, self.context_length)
        ]
        rows.sort(key=lambda row: -len(row[1]))
        totals = [0.0] * len(sequences)
        greedy = [True] * len(sequences)
        device = next(self.model.parameters()).device
        batches = range(0, len(rows), self.batch_size)
        for begin in tqdm(batches, desc="Scoring", unit="batch", disable=len(batches) < 2):
            batch = rows[begin : begin + self.batch_size]
            inputs = torch.zeros(len(batch), len(batch[0][1]), dtype=torch.long)
            for i, (_, window, _) in enumerate(batch):
                inputs[i, : len(window)] = torch.tensor(window)
            logits = self.model(inputs.to(device))
            for i, (index, window, targets) in enumerate(batch):
                logprobs = logits[i, len(window) - len(targets) : len(window)]
                logprobs = logprobs.float().log_softmax(dim=-1)
                target_ids = torch.tensor(targets, device=device)
                totals[index] += logprobs.gather(-1, target_ids[:, None]).sum().item()
                greedy[index] = greedy[index] and bool((logprobs.argmax(-1) == target_ids).all())
        return list(zip(totals, greedy, strict=True))

    def generate(self, context: str, options: dict[str, Any]) -> str:
        """The greedy continuation of `context`, cut before the first of the task's stop
        strings (`until`)."""
        if (options.get("do_sample") or options.get("temperature")) and not self.warned_sampling:
            log.warning(
                "The task asks to sample (%s); gptlab's harness model decodes greedily.", options
            )
            self.warned_sampling = True
        until = options.get("until") or []
        stops = [s for s in ([until] if isinstance(until, str) else until) if s]
        eot_id = self.tokenizer.eot_id
        ids = self.task_text(self.tokenizer.encode, context)[-self.context_length :]
        if not ids:
            if eot_id is None:
                raise ConfigError(
                    "The task asks to generate from an empty context, and a char model has no "
                    "start token: evaluate a model with the GPT-2 tokenizer (e.g. pretrained=gpt2)."
                )
            ids = [eot_id]
        prompt = torch.tensor([ids], device=next(self.model.parameters()).device)
        max_new_tokens = options.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
        tokens = (
            int(t[0]) for t in stream_tokens(self.model, prompt, max_new_tokens, eos_id=eot_id)
        )
        text = ""
        for piece in stream_text(self.tokenizer, (t for t in tokens if t != eot_id)):
            text += piece
            found = [text.find(stop) for stop in stops if stop in text]
            if found:
                return text[: min(found)]
        return text
