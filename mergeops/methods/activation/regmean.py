"""regmean — Regression Mean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights
of Language Models", arXiv 2212.09849).

For every linear weight W_i (out, in) with a Gram matrix G_i = X_iᵀX_i / n of its inputs on
model i's data (a ``gram`` side input per model, captured by
``registry.client.capture.capture_gram``), W = (Σ G̃_i)⁻¹-weighted mean
(Σ_i W_i G̃_i)(Σ_i G̃_i)⁻¹ with G̃ = alpha·G + (1 - alpha)·diag(G) (alpha 0.9). Every other
tensor (biases, norms, embeddings without a Gram) is averaged. No base needed. Grams are the
per-token means, so each model's data counts equally.
"""

from __future__ import annotations

import torch
from pydantic import Field

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    Need,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.regmean import regmean_linear
from mergeops.sources import TensorMeta, TensorSource


class RegMeanParams(MethodParams):
    """``alpha``: weight of the off-diagonal Gram entries (1 = exact RegMean, 0 = a
    diagonal-weighted average)."""

    alpha: float = Field(0.9, ge=0, le=1)


@register
class RegMean(StreamingMethod):
    """Closed-form least-squares merge of linear layers; other tensors averaged."""

    name = "regmean"
    paper = "https://arxiv.org/abs/2212.09849"
    params_model = RegMeanParams
    needs = frozenset({Need.GRAMS})

    def __init__(self) -> None:
        self._keys: dict[int, set[str]] = {}

    def _has(self, source: TensorSource, key: str) -> bool:
        if id(source) not in self._keys:
            self._keys[id(source)] = set(source.keys())
        return key in self._keys[id(source)]

    def check_side_input(self, kind: str, source: TensorSource, key: str, meta: TensorMeta) -> None:
        """A Gram, where present, is (in, in) for a 2-D weight; other tensors have none."""
        if not self._has(source, key):
            return
        shape = tuple(source.metadata(key).shape)
        if len(meta.shape) != 2 or shape != (meta.shape[1], meta.shape[1]):
            raise MergeError(
                f"gram of model '{source.name}' for '{key}' has shape {shape}; the weight is "
                f"{tuple(meta.shape)}, so its Gram must be ({meta.shape[-1]}, {meta.shape[-1]})"
            )

    def read_side_input(
        self, kind: str, source: TensorSource, key: str, device: torch.device
    ) -> torch.Tensor:
        """The Gram of ``key`` as float32, or an empty tensor when the model has none."""
        if not self._has(source, key):
            return torch.empty(0, device=device)
        return source.get(key).to(device=device, dtype=torch.float32)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, RegMeanParams)
        grams = inputs.side["gram"]
        present = [g.numel() > 0 for g in grams]
        if not any(present):
            return TensorResult(torch.stack(inputs.models).mean(dim=0))
        if not all(present):
            missing = ctx.model_names[present.index(False)]
            raise MergeError(
                f"tensor '{inputs.name}': model '{missing}' has no gram while others do"
            )
        return TensorResult(regmean_linear(inputs.models, grams, params.alpha))
