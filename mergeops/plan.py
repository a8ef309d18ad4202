"""Planning a merge: resolve the method, name and check every input up front.

Everything that can be known before reading tensor data is checked here — unknown method,
bad params, missing base/metric/second moment/fisher/objective, and tensor names, shapes and
dtypes across all inputs — so a bad merge fails before any output is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergeops.device import resolve_device, resolve_dtype
from mergeops.io.layouts import open_source
from mergeops.methods import base as mb
from mergeops.prefetch import DEFAULT_PREFETCH_BYTES
from mergeops.routing import TensorRoute
from mergeops.sources import Objective, TensorMeta, TensorSource

SourceLike = str | Path | TensorSource | Mapping[str, torch.Tensor]


@dataclass
class MergePlan:
    """A checked merge, ready for the engine to stream."""

    method: mb.MergeMethod
    ctx: mb.MergeContext
    models: list[TensorSource]
    base: TensorSource | None
    side: dict[str, list[TensorSource]]
    keys: list[str]
    metas: dict[str, TensorMeta]
    state_path: Path | None = None
    raw_params: dict[str, Any] = field(default_factory=dict)
    prefetch: bool = True
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES
    #: Per-output-tensor inputs and params (mergekit slices, gradients, filters); when set,
    #: ``keys``/``metas`` are the outputs' and ``models`` every source the routes read.
    routes: list[TensorRoute] | None = None
    #: Output metadata replacing the method/params record (routed plans: the config).
    description: dict[str, str] | None = None

    @property
    def reference(self) -> TensorSource:
        """The source whose dtypes and non-float tensors the output follows."""
        return self.base if self.base is not None else self.models[0]


@dataclass
class PlanRequest:
    """What a caller asked for (see ``mergeops.merge_files`` for the meaning of each field)."""

    method: str
    models: Sequence[SourceLike]
    base: SourceLike | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    model_params: Sequence[Mapping[str, Any]] | None = None
    model_names: Sequence[str] | None = None
    second_moments: Sequence[SourceLike] | None = None
    fisher: Sequence[SourceLike] | None = None
    grams: Sequence[SourceLike] | None = None
    metrics: Sequence[float | None] | Mapping[str, float] | None = None
    objective: Objective | None = None
    state_path: str | Path | None = None
    device: str | torch.device = "auto"
    dtype: str | torch.dtype | None = None
    compute_dtype: str | torch.dtype | None = "float32"
    seed: int = 0
    lora: Literal["factors", "delta", "full"] = "factors"
    prefetch: bool = True
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES


def build_plan(request: PlanRequest) -> MergePlan:
    """Open and check all inputs; raises ``MergeError`` naming the model, tensor or param."""
    method = mb.get_method(request.method)
    if not request.models:
        raise mb.MergeError(f"method '{method.name}' needs at least one model")
    base = None
    if request.base is not None:
        base = open_source(request.base, name="base" if isinstance(request.base, Mapping) else None)
    models = _open_models(request, base)
    names = [m.name for m in models]
    _check_needs(method, request, base, names)
    own = request.model_params or [{} for _ in models]
    if len(own) != len(models):
        raise mb.MergeError(f"{len(own)} per-model parameter sets for {len(models)} models")
    params, model_params = mb.split_params(method, request.params, own, names)
    ctx = mb.MergeContext(
        method=method.name,
        model_names=names,
        params=params,
        model_params=model_params,
        device=resolve_device(request.device),
        out_dtype=resolve_dtype(request.dtype),
        compute_dtype=resolve_dtype(request.compute_dtype),
        has_base=base is not None,
        metrics=_metrics(request.metrics, names),
        objective=request.objective,
        seed=request.seed,
    )
    side = _open_side(method, request, names)
    keys, metas = check_tensors(models, base)
    for kind, sources in side.items():
        for source in sources:
            for key in keys:
                method.check_side_input(kind, source, key, metas[key])
    method.validate(ctx)
    state_path = Path(request.state_path) if request.state_path is not None else None
    if request.prefetch_bytes < 0:
        raise mb.MergeError(f"prefetch_bytes must be >= 0, got {request.prefetch_bytes}")
    return MergePlan(
        method, ctx, models, base, side, keys, metas, state_path, dict(request.params),
        prefetch=request.prefetch, prefetch_bytes=request.prefetch_bytes,
    )  # fmt: skip


def _open_models(request: PlanRequest, base: TensorSource | None) -> list[TensorSource]:
    names = list(request.model_names) if request.model_names else [None] * len(request.models)
    if len(names) != len(request.models):
        raise mb.MergeError(f"{len(names)} model names for {len(request.models)} models")
    models = [
        open_source(
            item,
            name=name or (f"model_{i}" if isinstance(item, Mapping) else None),
            lora=request.lora,
            lora_base=base,
        )
        for i, (item, name) in enumerate(zip(request.models, names, strict=True))
    ]
    seen: set[str] = set()
    for model in models:
        if model.name in seen:
            raise mb.MergeError(f"two models are named '{model.name}'; names must be unique")
        seen.add(model.name)
    return models


def _check_needs(
    method: mb.MergeMethod, request: PlanRequest, base: TensorSource | None, names: list[str]
) -> None:
    needs = method.needs
    if mb.Need.BASE in needs and base is None:
        raise mb.MergeError(f"method '{method.name}' needs a base model")
    if mb.Need.OBJECTIVE in needs and request.objective is None:
        raise mb.MergeError(f"method '{method.name}' needs an objective")
    if mb.Need.METRICS in needs:
        values = _metrics(request.metrics, names)
        for name, value in zip(names, values, strict=True):
            if value is None:
                raise mb.MergeError(
                    f"method '{method.name}' needs a metric value for model '{name}'"
                )


def _metrics(
    metrics: Sequence[float | None] | Mapping[str, float] | None, names: list[str]
) -> list[float | None]:
    if metrics is None:
        return [None] * len(names)
    if isinstance(metrics, Mapping):
        unknown = [k for k in metrics if k not in names]
        if unknown:
            raise mb.MergeError(f"metric given for unknown model '{unknown[0]}'; models: {names}")
        return [None if metrics.get(n) is None else float(metrics[n]) for n in names]
    if len(metrics) != len(names):
        raise mb.MergeError(f"{len(metrics)} metric values for {len(names)} models")
    return [None if m is None else float(m) for m in metrics]


def _open_side(
    method: mb.MergeMethod, request: PlanRequest, names: list[str]
) -> dict[str, list[TensorSource]]:
    given = {
        mb.Need.SECOND_MOMENTS: request.second_moments,
        mb.Need.FISHER: request.fisher,
        mb.Need.GRAMS: request.grams,
    }
    side: dict[str, list[TensorSource]] = {}
    for need, kind in mb.SIDE_INPUTS.items():
        items = given[need]
        if need not in method.needs | method.optional or (
            items is None and need not in method.needs
        ):
            continue
        if items is None or len(items) != len(names):
            count = 0 if items is None else len(items)
            missing = names[count] if count < len(names) else names[-1]
            raise mb.MergeError(
                f"method '{method.name}' needs a {kind} per model; got {count} for "
                f"{len(names)} models (first without one: '{missing}')"
            )
        side[kind] = [open_source(item, name=name) for item, name in zip(items, names, strict=True)]
    return side


def check_tensors(
    models: list[TensorSource], base: TensorSource | None
) -> tuple[list[str], dict[str, TensorMeta]]:
    """Tensor names in the reference's order and their metas; names, shapes and dtypes must
    agree across base and models."""
    reference = base if base is not None else models[0]
    ref_role = "base" if base is not None else f"model '{models[0].name}'"
    keys = list(reference.keys())
    metas = {key: reference.metadata(key) for key in keys}
    key_set = set(keys)
    for model in models:
        other = set(model.keys())
        missing = [k for k in keys if k not in other]
        if missing:
            raise mb.MergeError(
                f"tensor '{missing[0]}' of {ref_role} is missing from model '{model.name}'"
            )
        extra = sorted(other - key_set)
        if extra:
            raise mb.MergeError(
                f"model '{model.name}' has tensor '{extra[0]}' that {ref_role} lacks"
            )
        for key in keys:
            meta = model.metadata(key)
            if tuple(meta.shape) != tuple(metas[key].shape):
                raise mb.MergeError(
                    f"shape mismatch for '{key}': {ref_role} {tuple(metas[key].shape)}, "
                    f"model '{model.name}' {tuple(meta.shape)}"
                )
            if meta.dtype != metas[key].dtype:
                raise mb.MergeError(
                    f"dtype mismatch for '{key}': {ref_role} {metas[key].dtype}, "
                    f"model '{model.name}' {meta.dtype}"
                )
    return keys, metas
