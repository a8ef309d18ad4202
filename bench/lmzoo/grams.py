"""Layer-input Gram matrices of the LM zoo's models, for activation-aware merges (regmean,
regmean_plusplus): per task fine-tune, the mean XᵀX of every linear layer's inputs over the
tokens of that task's training examples, recorded by ``registry.client.capture.GramRecorder``
(forward pre-hooks on each ``nn.Linear``) exactly as a client would capture them.

Examples are grouped by length so no batch holds padding (padding positions are not data).
The tied output head (``lm_head.weight``) is left out: the saved checkpoints do not have it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from bench.lmzoo.model import Batch, batch
from bench.lmzoo.tasks import examples
from registry.client.capture import GramRecorder

#: Train examples per task whose tokens make up a Gram (tokens: ~15 per example).
GRAM_EXAMPLES = 256
TIED_HEAD = "lm_head.weight"


def unpadded_batches(task: str, *, seed: int, n: int = GRAM_EXAMPLES) -> Iterator[Batch]:
    """``n`` train examples of ``task`` as batches of equal length (no padding)."""
    by_length: dict[int, list[tuple[str, str]]] = {}
    for prompt, answer in examples(task, "train", n=n, seed=seed + 3, at_most=True):
        by_length.setdefault(len(prompt) + len(answer), []).append((prompt, answer))
    for length in sorted(by_length):
        yield batch(by_length[length])


def record_grams(
    model: torch.nn.Module,
    task: str,
    *,
    seed: int,
    n: int = GRAM_EXAMPLES,
    params: Mapping[str, torch.Tensor] | None = None,
) -> GramRecorder:
    """Run ``n`` train examples of ``task`` through ``model`` (with ``params`` substituted
    through ``torch.func.functional_call`` when given) under a ``GramRecorder``."""
    from torch.func import functional_call

    with GramRecorder(model) as recorder, torch.no_grad():
        for data in unpadded_batches(task, seed=seed, n=n):
            inputs = {"input_ids": data.input_ids, "attention_mask": data.attention_mask}
            if params is None:
                model(**inputs)
            else:
                functional_call(model, dict(params), args=(), kwargs=inputs, strict=False)
    recorder.sums.pop(TIED_HEAD, None)
    return recorder


def save_task_grams(model: torch.nn.Module, task: str, path: Path, *, seed: int) -> Path:
    """The fine-tune's Grams on its own task, written as a ``gram`` artifact file."""
    return record_grams(model, task, seed=seed).save(path)


class LMGramProbe:
    """The LM zoo's ``GramProbe`` (regmean_plusplus): model names are task names; Grams are
    recomputed with the given (partly merged) parameters on that task's train examples."""

    def __init__(self, model: torch.nn.Module, seed: int, *, n: int = GRAM_EXAMPLES) -> None:
        self.model, self.seed, self.n = model, seed, n

    def linear_weights(self) -> list[str]:
        return [
            f"{name}.weight"
            for name, module in self.model.named_modules()
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" != TIED_HEAD
        ]

    def input_grams(
        self, params: Mapping[str, torch.Tensor], model_name: str
    ) -> dict[str, torch.Tensor]:
        tensors = {k: v.float() for k, v in params.items()}
        if "model.embed_tokens.weight" in tensors:
            tensors[TIED_HEAD] = tensors["model.embed_tokens.weight"]
        recorder = record_grams(self.model, model_name, seed=self.seed, n=self.n, params=tensors)
        return {k: v / recorder.tokens for k, v in recorder.sums.items()}
