"""Merge configs in YAML: mergekit's schema, extended for mergeops' other methods.

mergekit keys: ``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``,
``parameters``, ``dtype`` (``out_dtype`` wins when both are given). Scalar parameters only;
mergekit gradients, per-tensor filters and ``slices``/``modules`` are rejected with an error.
A model listed in ``models`` that is also ``base_model`` is the base, as in mergekit, for the
methods that use a base. Extensions:

    models:
      - model: ckpt/ft-1            # file, sharded folder or PEFT adapter folder
        name: ft-1                  # defaults to the path's name
        metric: 0.42                # mwa
        second_moment: ckpt/ft-1-v  # ota / ffg
        fisher: ckpt/ft-1-fisher    # fisher
    objective: my_pkg.proxy:make_objective   # fw: module:attribute (called if callable)
    evaluator: digits                         # fw: a ``ckreg.evaluators`` entry point
    state: runs/opcm-state                    # opcm state, loaded and saved
    max_shard_size: 2GB
    device: auto
    seed: 0
    lora: factors                             # adapters: factors | delta (B·A) | full (base + B·A)

Relative paths are resolved against the config file's folder. ``dtype`` (or ``out_dtype``)
is the output dtype; computation is always float32, so mergekit's fp32 outputs match.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from mergeops.methods.base import MergeError, Need, get_method
from mergeops.sources import Objective

_IGNORED_MERGEKIT_KEYS = ("tokenizer_source", "tokenizer", "chat_template")


class ModelEntry(BaseModel):
    """One ``models[]`` entry."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    name: str | None = None
    parameters: dict[str, Any] = {}
    metric: float | None = None
    second_moment: str | None = None
    fisher: str | None = None

    @field_validator("parameters")
    @classmethod
    def _scalars_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_scalars(value)


class MergeConfig(BaseModel):
    """A parsed merge YAML."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    objective: str | None = None
    evaluator: str | None = None
    state: str | None = None
    max_shard_size: int | str = "5GB"
    device: str = "auto"
    seed: int = 0
    lora: Literal["factors", "delta", "full"] = "factors"

    @field_validator("parameters")
    @classmethod
    def _scalars_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_scalars(value)


def _check_scalars(params: dict[str, Any]) -> dict[str, Any]:
    for key, value in params.items():
        if not isinstance(value, bool | int | float | str):
            raise ValueError(
                f"parameter '{key}' must be a scalar; mergekit gradients and filters "
                f"are not supported (got {value!r})"
            )
    return params


def parse_config(data: dict[str, Any]) -> MergeConfig:
    """Validate a config mapping; raises ``MergeError`` naming the bad key."""
    if not isinstance(data, dict):
        raise MergeError("a merge config must be a mapping with 'merge_method' and 'models'")
    for key in ("slices", "modules"):
        if key in data:
            raise MergeError(f"mergekit '{key}' configs are not supported; list 'models' instead")
    cleaned = {k: v for k, v in data.items() if k not in _IGNORED_MERGEKIT_KEYS}
    cleaned["models"] = [
        {"model": m} if isinstance(m, str) else m for m in cleaned.get("models") or []
    ]
    try:
        return MergeConfig.model_validate(cleaned)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise MergeError(f"bad merge config: {problems}") from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MergeError(f"cannot read merge config '{path}': {exc}") from None
    return parse_config(data)


def _resolve(root: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else root / path)


def load_objective(config: MergeConfig) -> Objective | None:
    """The objective named by ``objective`` (module:attribute) or ``evaluator`` (entry point)."""
    if config.evaluator is not None:
        found = entry_points(group="ckreg.evaluators", name=config.evaluator)
        if not found:
            raise MergeError(
                f"no evaluator '{config.evaluator}' in entry points 'ckreg.evaluators'"
            )
        return next(iter(found)).load()().objective()
    if config.objective is None:
        return None
    module_name, _, attr = config.objective.partition(":")
    if not attr:
        raise MergeError(f"objective '{config.objective}' must look like 'package.module:name'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise MergeError(f"cannot load objective '{config.objective}': {exc}") from None
    is_factory = isinstance(target, type) or (callable(target) and not hasattr(target, "loss"))
    objective = target() if is_factory else target
    if not isinstance(objective, Objective):
        raise MergeError(f"objective '{config.objective}' has no loss(params) method")
    return objective


def to_merge_kwargs(config: MergeConfig, root: str | Path) -> dict[str, Any]:
    """Keyword arguments for ``mergeops.merge_files`` (all but ``out_dir``)."""
    root = Path(root)
    method = get_method(config.merge_method)
    uses_base = Need.BASE in method.needs | method.optional
    entries = [
        e
        for e in config.models
        if not (uses_base and config.base_model is not None and e.model == config.base_model)
    ]
    if not entries:
        raise MergeError("the config lists no model to merge besides the base")
    kwargs: dict[str, Any] = {
        "method": config.merge_method,
        "models": [_resolve(root, e.model) for e in entries],
        "model_names": [e.name or Path(e.model).name.removesuffix(".safetensors") for e in entries],
        "model_params": [dict(e.parameters) for e in entries],
        "base": _resolve(root, config.base_model) if config.base_model else None,
        "params": dict(config.parameters),
        "dtype": config.out_dtype or config.dtype,
        "max_shard_size": config.max_shard_size,
        "device": config.device,
        "seed": config.seed,
        "lora": config.lora,
        "objective": load_objective(config),
        "state_path": _resolve(root, config.state) if config.state else None,
    }
    if any(e.metric is not None for e in entries):
        kwargs["metrics"] = [e.metric for e in entries]
    for key in ("second_moment", "fisher"):
        values = [getattr(e, key) for e in entries]
        if any(v is not None for v in values):
            missing = [e.name or e.model for e, v in zip(entries, values, strict=True) if v is None]
            if missing:
                raise MergeError(f"models[] entry '{missing[0]}' has no '{key}' while others do")
            kwargs["second_moments" if key == "second_moment" else "fisher"] = [
                _resolve(root, v) for v in values
            ]
    return kwargs
