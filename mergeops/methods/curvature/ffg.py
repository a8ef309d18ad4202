"""ffg — Fast Fisher Grafting (arXiv 2509.11167): per-model masks ``[v ⊙ τ² ≥ thr]``.

One threshold per model over all of its tensors: given (``threshold``), or the exact
model-wide quantile keeping a fraction ``density`` of the entries, found by a two-pass radix
selection (``MagnitudeSelector``: bounded memory, exact). Outputs bit-packed masks as extra
streams ``mask.<model>`` (uint8 bytes plus a ``<tensor>:shape`` companion; unpack with
``mergeops.ops.masks.unpack_masks``) and, with ``graft``, the grafted model θ0 + M ⊙ τ: as the
main output for one model, as streams ``grafted.<model>`` (float32) for several.

Also home of the second-moment side-input handling shared with ota: a missing tensor is an
error naming model and tensor, and a 2-D second moment may be stored factored as
``<tensor>:rank1_rows`` / ``<tensor>:rank1_cols`` (the rank-1 compression).
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field, model_validator

from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MergeMethod,
    MethodParams,
    ModelParams,
    Need,
    StatsCollector,
    StreamingMethod,
    TensorInputs,
    TensorResult,
    register,
)
from mergeops.ops.curvature import rank1_approx, rank1_expand
from mergeops.ops.masks import (
    MagnitudeSelector,
    ffg_saliency,
    graft,
    keep_count,
    pack_masks_inline,
    threshold_mask,
)
from mergeops.sources import TensorMeta, TensorSource

PAPER = "https://arxiv.org/abs/2509.11167"
ROWS_SUFFIX = ":rank1_rows"
COLS_SUFFIX = ":rank1_cols"
SecondMomentLayout = Literal["full", "rank1"]


def stream_name(prefix: str, model_name: str) -> str:
    """An output stream name for a model (characters outside ``[A-Za-z0-9._-]`` become ``_``)."""
    return f"{prefix}.{re.sub(r'[^A-Za-z0-9._-]', '_', model_name)}"


class SecondMomentInput(MergeMethod):
    """Second-moment side inputs: full tensors, or rank-1 factors stored under two names."""

    def _keys_of(self, source: TensorSource) -> set[str]:
        cache: dict[int, set[str]] = self.__dict__.setdefault("_side_keys", {})
        if id(source) not in cache:
            cache[id(source)] = set(source.keys())
        return cache[id(source)]

    def check_side_input(self, kind: str, source: TensorSource, key: str, meta: TensorMeta) -> None:
        if kind != "second_moment":
            return super().check_side_input(kind, source, key, meta)
        if not meta.dtype.is_floating_point:
            return None  # integer buffers are passed through, never merged
        keys = self._keys_of(source)
        if key in keys:
            shape = tuple(source.metadata(key).shape)
        elif key + ROWS_SUFFIX in keys and key + COLS_SUFFIX in keys and len(meta.shape) == 2:
            rows, cols = source.metadata(key + ROWS_SUFFIX), source.metadata(key + COLS_SUFFIX)
            shape = (rows.shape[0], cols.shape[0])
        else:
            raise MergeError(f"missing second moment for model '{source.name}' tensor '{key}'")
        if shape != tuple(meta.shape):
            raise MergeError(
                f"shape mismatch for second moment of model '{source.name}' tensor '{key}': "
                f"{shape}, weights {tuple(meta.shape)}"
            )

    def read_side_input(
        self, kind: str, source: TensorSource, key: str, device: torch.device
    ) -> torch.Tensor:
        if kind != "second_moment" or key in self._keys_of(source):
            return super().read_side_input(kind, source, key, device)
        rows, cols = source.get(key + ROWS_SUFFIX), source.get(key + COLS_SUFFIX)
        return rank1_expand(rows, cols).to(device)


def second_moments(inputs: TensorInputs, layout: SecondMomentLayout) -> list[torch.Tensor]:
    """The models' second moments for this tensor, rank-1 compressed when asked."""
    moments = inputs.side["second_moment"]
    return [rank1_approx(v) for v in moments] if layout == "rank1" else moments


class FfgParams(MethodParams):
    """``graft``: also output θ0 + M ⊙ τ; ``second_moment``: ``rank1`` compresses 2-D v first."""

    graft: bool = True
    second_moment: SecondMomentLayout = "full"


class FfgModelParams(ModelParams):
    """Per model: ``density`` (fraction of entries kept) or a fixed saliency ``threshold``."""

    density: float | None = Field(None, gt=0, le=1)
    threshold: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_of(self) -> FfgModelParams:
        if (self.density is None) == (self.threshold is None):
            raise ValueError(
                f"give exactly one of density or threshold (got density={self.density}, "
                f"threshold={self.threshold})"
            )
        return self


class FfgThresholds(StatsCollector):
    """Each model's saliency threshold: given, or the exact k-th largest over two passes."""

    def __init__(self, ctx: MergeContext, layout: SecondMomentLayout) -> None:
        self.layout = layout
        self.params: list[FfgModelParams] = [p for p in ctx.model_params]  # type: ignore[misc]
        self.selectors = [MagnitudeSelector() if p.threshold is None else None for p in self.params]
        self.second_pass = False

    def observe(self, inputs: TensorInputs, ctx: MergeContext) -> None:
        moments = second_moments(inputs, self.layout)
        for selector, tv, v in zip(self.selectors, inputs.task_vectors(), moments, strict=True):
            if selector is not None:
                selector.observe(ffg_saliency(v, tv))

    def next_pass(self) -> bool:
        if self.second_pass or all(s is None for s in self.selectors):
            return False
        for selector, params in zip(self.selectors, self.params, strict=True):
            if selector is not None:
                assert params.density is not None
                selector.begin_second_pass(keep_count(selector.total, params.density))
        self.second_pass = True
        return True

    def result(self) -> list[float]:
        return [
            float(p.threshold) if s is None else s.result()  # type: ignore[arg-type]
            for s, p in zip(self.selectors, self.params, strict=True)
        ]


def ffg_masks(
    inputs: TensorInputs, thresholds: list[float], layout: SecondMomentLayout
) -> list[torch.Tensor]:
    """``M_t = [v_t ⊙ τ_t² ≥ thr_t]`` for every model, for this tensor."""
    moments = second_moments(inputs, layout)
    return [
        threshold_mask(ffg_saliency(v, tv), thr)
        for v, tv, thr in zip(moments, inputs.task_vectors(), thresholds, strict=True)
    ]


@register
class Ffg(SecondMomentInput, StreamingMethod):
    """FFG masks per model, bit-packed, and optionally the grafted model(s)."""

    name = "ffg"
    paper = PAPER
    params_model = FfgParams
    model_params_model = FfgModelParams
    needs = frozenset({Need.BASE, Need.SECOND_MOMENTS})

    def stats_collector(self, ctx: MergeContext) -> StatsCollector | None:
        params = ctx.params
        assert isinstance(params, FfgParams)
        return FfgThresholds(ctx, params.second_moment)

    def merge_tensor(self, inputs: TensorInputs, ctx: MergeContext) -> TensorResult:
        params = ctx.params
        assert isinstance(params, FfgParams) and inputs.base is not None
        masks = ffg_masks(inputs, ctx.stats, params.second_moment)
        extras = {
            stream_name("mask", name): pack_masks_inline({inputs.name: mask})
            for name, mask in zip(ctx.model_names, masks, strict=True)
        }
        if not params.graft:
            return TensorResult(None, extras)
        grafted = [
            graft(inputs.base, tv, m) for tv, m in zip(inputs.task_vectors(), masks, strict=True)
        ]
        if len(grafted) == 1:
            return TensorResult(grafted[0], extras)
        for name, model in zip(ctx.model_names, grafted, strict=True):
            extras[stream_name("grafted", name)] = {inputs.name: model}
        return TensorResult(None, extras)
