"""Merge configs in YAML: mergekit 0.1.5's whole schema, extended for mergeops' other methods.

The schema lives in ``mergeops.mergekit.schema`` (``models`` or ``slices``, gradients,
``filter:`` lists, ``dtype``/``out_dtype``, ``tokenizer_source``/``tokenizer``,
``chat_template``, ``model+lora`` references); ``modules`` is refused with the reason. Every
config follows mergekit's conventions (omitted params take mergekit's defaults, the merge
computes in ``dtype``) unless it says ``conventions: ckreg`` (ckreg's defaults, float32).
Extensions:

    models:
      - model: ckpt/ft-1            # file, sharded folder, PEFT adapter folder or model+lora
        name: ft-1                  # defaults to the path's name
        metric: 0.42                # mwa
        second_moment: ckpt/ft-1-v  # ota / ffg
        fisher: ckpt/ft-1-fisher    # fisher
    objective: my_pkg.proxy:make_objective   # fw: module:attribute (called if callable);
                                              # pleas/ot_fusion: a feature probe
    evaluator: digits                         # fw: a ``ckreg.evaluators`` entry point
    state: runs/opcm-state                    # opcm state, loaded and saved
    max_shard_size: 2GB
    device: auto
    seed: 0                                   # or random_seed (mergekit's --random-seed)
    lora: factors                             # adapters: factors | delta (B·A) | full

Relative paths are resolved against the config file's folder. ``run_config`` writes a
loadable model folder (shards, config.json, tokenizer, generation config, model card).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergeops.mergekit import schema
from mergeops.mergekit.plan import IGNORABLE, uses_base
from mergeops.mergekit.schema import InputModel, MergeConfig
from mergeops.methods.base import MergeError, _field_names, get_method
from mergeops.sources import FeatureProbe, Objective

if TYPE_CHECKING:
    from mergeops.engine import MergeResult

ModelEntry = InputModel
__all__ = ["MergeConfig", "ModelEntry", "load_config", "parse_config", "run_config"]


def parse_config(data: Any) -> MergeConfig:
    """Validate a config mapping; raises ``MergeError`` naming the bad key."""
    return schema.parse(data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a merge YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MergeError(f"cannot read merge config '{path}': {exc}") from None
    if not isinstance(data, dict):
        raise MergeError(f"merge config '{path}' must be a mapping with 'merge_method'")
    return data


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file."""
    return parse_config(read_yaml(path))


def _resolve(root: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else root / path)


def load_objective(config: MergeConfig) -> Objective | FeatureProbe | None:
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
    if not isinstance(objective, Objective | FeatureProbe):  # a feature probe: pleas, ot_fusion
        raise MergeError(f"objective '{config.objective}' has no loss(params) method "
                         "(nor layer_order/features/layer_inputs, a feature probe's)")  # fmt: skip
    return objective


def _entries(config: MergeConfig, method_uses_base: bool) -> list[InputModel]:
    base = config.base_model
    entries = [e for e in config.models if not (method_uses_base and base and e.model == base)]
    listed = any(e.model == base for e in config.models)
    if config.is_mergekit and base and not method_uses_base and not listed:
        entries.append(InputModel(model=base))  # mergekit merges the base as one more input
    if not entries:
        raise MergeError("the config lists no model to merge besides the base")
    return entries


def _with_defaults(config: MergeConfig, entries: list[InputModel]) -> tuple[dict, list[dict]]:
    """Global and per-model params, mergekit's defaults filling what the YAML omits."""
    method = get_method(config.merge_method)
    accepted = _field_names(method.params_model) | _field_names(method.model_params_model)
    given = {k: v for k, v in config.parameters.items() if k in accepted or k not in IGNORABLE}
    defaults = method.mergekit_defaults if config.is_mergekit else {}
    per_model = _field_names(method.model_params_model)
    params = {**{k: v for k, v in defaults.items() if k not in per_model}, **given}
    own = []
    for entry in entries:
        values = {k: v for k, v in entry.parameters.items() if k in accepted or k not in IGNORABLE}
        for key, value in defaults.items():
            if key in per_model and key not in values and key not in given:
                values[key] = value
        own.append(values)
    return params, own


def to_merge_kwargs(config: MergeConfig, root: str | Path) -> dict[str, Any]:
    """Keyword arguments for ``mergeops.merge_files`` (all but ``out_dir``) of a config
    without slices or per-tensor params (``run_config`` takes any config)."""
    from mergeops.mergekit.build import compute_dtype

    root = Path(root)
    if config.slices or any(not isinstance(v, bool | int | float | str)
                            for s in [config.parameters, *(m.parameters for m in config.models)]
                            for v in s.values()):  # fmt: skip
        raise MergeError("this config has slices or per-tensor params; use run_config")
    method = get_method(config.merge_method)
    method_uses_base = uses_base(method)
    entries = _entries(config, method_uses_base)
    params, own = _with_defaults(config, entries)
    kwargs: dict[str, Any] = {
        "method": config.merge_method,
        "models": [_resolve(root, e.model) for e in entries],
        "model_names": [e.name or Path(e.model).name.removesuffix(".safetensors") for e in entries],
        "model_params": own,
        "base": _resolve(root, config.base_model) if config.base_model else None,
        "params": params,
        "dtype": config.out_dtype or config.dtype,
        "compute_dtype": compute_dtype(config),
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


def run_config(
    path: str | Path,
    out_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Run a merge YAML into ``out_dir`` as a loadable model folder (``ckreg merge``).

    ``overrides`` replace top-level keys (``device``, ``dtype``, ``max_shard_size``, ``seed``).
    """
    from mergeops.mergekit.run import run_merge_config

    path = Path(path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw = read_yaml(path)
    if "seed" in given:
        raw.pop("random_seed", None)
    raw = {**raw, **given}
    return run_merge_config(parse_config(raw), raw, path.parent, Path(out_dir),
                            overwrite=overwrite, progress=progress)  # fmt: skip
