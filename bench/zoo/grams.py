"""Layer-input Gram matrices of the digits zoo's backbone, for activation-aware merges
(regmean): per task fine-tune, XᵀX / n of ``fc1``'s and ``fc2``'s inputs on that task's
training inputs — what ``registry.client.capture.capture_gram`` records with hooks on an
``nn.Module`` (the zoo's network is written as functions, so the inputs are computed here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.zoo.data import task_data
from bench.zoo.model import Params

#: Gram examples per task (the training split's size is larger; 512 is plenty for 64/128 dims).
GRAM_EXAMPLES = 512


def backbone_grams(params: Params, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean XᵀX of each backbone linear layer's inputs, keyed by the layer's weight name."""
    with torch.no_grad():
        hidden = F.linear(x, params["fc1.weight"], params["fc1.bias"])
        hidden = F.relu(
            F.layer_norm(hidden, hidden.shape[-1:], params["norm1.weight"], params["norm1.bias"])
        )
    n = x.shape[0]
    return {"fc1.weight": x.T @ x / n, "fc2.weight": hidden.T @ hidden / n}


def task_grams(params: Params, task: str, *, seed: int) -> dict[str, torch.Tensor]:
    """``backbone_grams`` of one fine-tune on (up to ``GRAM_EXAMPLES``) train inputs of its task."""
    x = task_data(task, "train", seed=seed).x[:GRAM_EXAMPLES]
    return backbone_grams({k: v.float() for k, v in params.items()}, x)


class DigitsGramProbe:
    """The ``GramProbe`` of the digits zoo (regmean_plusplus): model names are task names."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def linear_weights(self) -> list[str]:
        return ["fc1.weight", "fc2.weight"]

    def input_grams(self, params: Params, model_name: str) -> dict[str, torch.Tensor]:
        return task_grams(params, model_name, seed=self.seed)
