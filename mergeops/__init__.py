"""mergeops: a streaming model-merge engine (torch + safetensors only).

Two entry points:

- ``merge(method, models, *, base=None, **params) -> dict[str, Tensor]`` merges in memory;
- ``merge_files(method, models, *, out_dir, ...) -> MergeResult`` streams tensor by tensor
  from files (or any ``TensorSource``) into sharded safetensors, atomically.

Methods and their params: ``available_methods()``, ``get_method(name)``; formulas in
METHODS.md. Per-model params (``weight``, ``density``) may be given once for all models,
as a list with one value per model, or per model via ``model_params=[{...}, ...]``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from mergeops.prefetch import DEFAULT_PREFETCH_BYTES

# torch and the engine are imported on first use, not with the package: ``ckreg --help`` and
# other torch-free commands (``import mergeops.cli``) stay fast.
if TYPE_CHECKING:
    import torch

    from mergeops.engine import MergeResult
    from mergeops.io import open_source
    from mergeops.methods import available_methods, get_method
    from mergeops.methods.base import MergeError, ModelResult
    from mergeops.plan import PlanRequest, SourceLike
    from mergeops.sources import Evaluator, Objective, TensorMeta, TensorSource

    ModelsLike: TypeAlias = Sequence[SourceLike] | Mapping[str, SourceLike]

_LAZY = {
    "Evaluator": "mergeops.sources",
    "MergeError": "mergeops.methods.base",
    "MergeResult": "mergeops.engine",
    "Objective": "mergeops.sources",
    "TensorMeta": "mergeops.sources",
    "TensorSource": "mergeops.sources",
    "available_methods": "mergeops.methods",
    "get_method": "mergeops.methods",
    "open_source": "mergeops.io",
}


def __getattr__(name: str) -> Any:
    """Import the public names of ``_LAZY`` when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'mergeops' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "Evaluator",
    "MergeError",
    "MergeResult",
    "Objective",
    "TensorMeta",
    "TensorSource",
    "available_methods",
    "get_method",
    "merge",
    "merge_files",
    "merge_with_extras",
    "open_source",
]


def _split_models(models: ModelsLike) -> tuple[list[SourceLike], list[str] | None]:
    import torch

    from mergeops.methods.base import MergeError

    if isinstance(models, Mapping):
        if models and all(isinstance(v, torch.Tensor) for v in models.values()):
            raise MergeError(
                "pass several models: a list of state dicts or a name -> model mapping"
            )
        return list(models.values()), [str(k) for k in models]
    return list(models), None


def _distribute(
    method: str,
    params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]] | None,
    count: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Turn list-valued per-model params (one value per model) into per-model dicts."""
    from mergeops.methods import get_method
    from mergeops.methods.base import MergeError, _field_names

    per_model_fields = _field_names(get_method(method).model_params_model)
    own = (
        [dict(p) for p in model_params] if model_params is not None else [{} for _ in range(count)]
    )
    shared: dict[str, Any] = {}
    for key, value in params.items():
        if key in per_model_fields and isinstance(value, list | tuple):
            if len(value) != count:
                raise MergeError(f"parameter '{key}' has {len(value)} values for {count} models")
            for entry, item in zip(own, value, strict=True):
                entry.setdefault(key, item)
        else:
            shared[key] = value
    return shared, own


def _request(
    method: str,
    models: ModelsLike,
    base: SourceLike | None,
    params: Mapping[str, Any],
    options: dict[str, Any],
) -> PlanRequest:
    from mergeops.plan import PlanRequest

    sources, names = _split_models(models)
    if options.get("model_names") is not None:
        names = list(options.pop("model_names"))
    options.pop("model_names", None)
    shared, own = _distribute(method, params, options.pop("model_params", None), len(sources))
    return PlanRequest(
        method=method,
        models=sources,
        base=base,
        params=shared,
        model_params=own,
        model_names=names,
        **options,
    )


def merge_with_extras(
    method: str, models: ModelsLike, *, base: SourceLike | None = None, **params: Any
) -> ModelResult:
    """Like ``merge`` but also returns the method's extra outputs (masks, task vectors)."""
    from mergeops.engine import merge_to_dicts
    from mergeops.plan import build_plan

    options = {k: params.pop(k) for k in _OPTIONS if k in params}
    plan = build_plan(_request(method, models, base, params, options))
    return merge_to_dicts(plan)


_OPTIONS = (
    "model_params",
    "model_names",
    "second_moments",
    "fisher",
    "grams",
    "metrics",
    "objective",
    "state_path",
    "device",
    "dtype",
    "compute_dtype",
    "seed",
    "lora",
    "prefetch",
    "prefetch_bytes",
)


def merge(
    method: str, models: ModelsLike, *, base: SourceLike | None = None, **params: Any
) -> dict[str, torch.Tensor]:
    """Merge in memory and return the merged state dict (CPU tensors, base dtype).

    ``models``: a list of state dicts / paths / ``TensorSource``s, or a name -> model mapping.
    ``params``: method params (``lambda``, ``normalize``, ``trim_scope``, ...) and per-model
    params (a scalar for all models or a list with one value per model), plus the options
    ``model_params``, ``model_names``, ``second_moments``, ``fisher``, ``grams`` (layer-input Gram matrices per model, for
    regmean), ``metrics``,
    ``objective``, ``state_path``, ``device`` (default ``auto``), ``dtype``, ``seed`` and
    ``lora`` (see ``merge_files``).
    """
    return merge_with_extras(method, models, base=base, **params).merged


def merge_files(
    method: str,
    models: ModelsLike,
    *,
    out_dir: str | Path,
    base: SourceLike | None = None,
    params: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    model_names: Sequence[str] | None = None,
    second_moments: Sequence[SourceLike] | None = None,
    fisher: Sequence[SourceLike] | None = None,
    grams: Sequence[SourceLike] | None = None,
    metrics: Sequence[float | None] | Mapping[str, float] | None = None,
    objective: Objective | None = None,
    state_path: str | Path | None = None,
    max_shard_size: int | str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    compute_dtype: str | torch.dtype | None = "float32",
    seed: int = 0,
    lora: Literal["factors", "delta", "full"] = "factors",
    progress: bool = True,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
    prefetch: bool = True,
    prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
    **extra_params: Any,
) -> MergeResult:
    """Stream a merge into ``out_dir`` (which must not exist or be empty).

    Writes sharded safetensors plus ``model.safetensors.index.json``; extra outputs (masks,
    task vectors) go to sub-folders named by stream. PEFT adapter folders are merged as
    their stored factors by default; ``lora="delta"`` merges ΔW = (alpha/r)·B·A per adapted
    weight, ``lora="full"`` merges base + ΔW as full weights (needs ``base``).
    All inputs are checked before anything is written; on any failure ``out_dir`` is left
    as it was (a NaN/Inf input or merged value is such a failure). ``prefetch`` reads the next
    tensor's (or slice's) inputs in a few threads while the current one is merged, with at
    most ``prefetch_bytes`` read ahead. ``max_shard_size`` defaults to
    ``mergeops.io.DEFAULT_MAX_SHARD_SIZE``. ``compute_dtype`` is the dtype methods compute
    in (None: the inputs' own); ``overwrite`` replaces a non-empty ``out_dir`` after success;
    ``finalize(folder)`` adds files before the folder is moved into place. Returns paths and
    counters.
    """
    from mergeops.engine import merge_to_dir
    from mergeops.io import DEFAULT_MAX_SHARD_SIZE
    from mergeops.plan import build_plan

    options: dict[str, Any] = {
        "model_params": model_params,
        "model_names": model_names,
        "second_moments": second_moments,
        "fisher": fisher,
        "grams": grams,
        "metrics": metrics,
        "objective": objective,
        "state_path": state_path,
        "device": device,
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "seed": seed,
        "lora": lora,
        "prefetch": prefetch,
        "prefetch_bytes": prefetch_bytes,
    }
    all_params = {**(params or {}), **extra_params}
    plan = build_plan(_request(method, models, base, all_params, options))
    shard_size = DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
    return merge_to_dir(plan, out_dir, max_shard_size=shard_size, progress=progress,
                        overwrite=overwrite, finalize=finalize)  # fmt: skip
