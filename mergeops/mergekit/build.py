"""Build a merge from a parsed config: the engine plan plus the model folder to write.

A config without per-tensor variation (``models:`` with scalar params, no LoRA reference, no
tokenizer source) takes the plain plan (chunked, prefetched, CUDA pipeline); anything else
becomes a routed plan (``mergeops.routing``). Under mergekit conventions params the YAML
omits take the method's ``mergekit_defaults`` and inputs are handed over in ``dtype``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mergeops.device import resolve_device, resolve_dtype
from mergeops.io.model_folder import ModelFolder
from mergeops.mergekit import architecture, tokenizer
from mergeops.mergekit.plan import Planner, Route, layer_counts, slices_of
from mergeops.mergekit.schema import MergeConfig
from mergeops.mergekit.sources import ModelRef, open_models
from mergeops.mergekit.vocab_rows import remap_rows
from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.routing import TensorRoute, Transform, check_route_shapes
from mergeops.sources import TensorMeta


@dataclass
class Prepared:
    """A checked merge: the plan (or plain ``merge_files`` kwargs) and the folder files."""

    folder: ModelFolder
    plan: MergePlan | None = None
    kwargs: dict[str, Any] | None = None
    scratch: tempfile.TemporaryDirectory[str] | None = None
    inputs: list[Path] = dataclasses.field(default_factory=list)  # every model path read

    def _with(self, scratch: tempfile.TemporaryDirectory[str], inputs: list[Path]) -> Prepared:
        self.scratch, self.inputs = scratch, inputs
        return self


def compute_dtype(config: MergeConfig) -> torch.dtype | None:
    """mergekit: ``dtype`` (None: as stored); ckreg conventions: float32."""
    return resolve_dtype(config.dtype) if config.is_mergekit else torch.float32


def is_uniform(config: MergeConfig, settings: tokenizer.TokenizerSettings) -> bool:
    """True when every tensor merges the same models with the same params."""
    scalar = (bool, int, float, str)
    scopes = [config.parameters, *(m.parameters for m in config.models)]
    return (
        not config.slices
        and all(isinstance(v, scalar) for scope in scopes for v in scope.values())
        and not any("+" in m.model for m in config.models)
        and settings.source is None
    )


def _folder(config: MergeConfig, refs: dict[str, ModelRef], raw: dict[str, Any]) -> ModelFolder:
    reference = config.base_model or next(iter(refs))
    listed = [k for k in refs if k != config.base_model]
    base_models = [*([config.base_model] if config.base_model else []), *listed]
    return ModelFolder(
        reference_dir=refs[reference].folder,
        out_dtype=resolve_dtype(config.out_dtype or config.dtype),
        method=config.merge_method,
        base_models=base_models,
        config_yaml=yaml.safe_dump(raw, sort_keys=False),
    )


def prepare(
    config: MergeConfig, raw: dict[str, Any], root: Path, *, device: str, uniform_kwargs: Callable
) -> Prepared:
    """Open every model, plan the tokenizer and the tensors; raises ``MergeError``."""
    refs = open_models(config, root)
    folder = _folder(config, refs, raw)
    inputs = [p for ref in refs.values() for p in (ref.path, ref.lora) if p is not None]
    try:
        settings = tokenizer.TokenizerSettings.from_mergekit(raw)
    except ValueError as exc:
        raise mb.MergeError(f"bad tokenizer settings: {exc}") from None
    scratch = tempfile.TemporaryDirectory(prefix="ckreg-tokenizer-")
    folder.tokenizer_dir = Path(scratch.name)
    try:
        return _plan(config, root, refs, settings, folder, device, uniform_kwargs)._with(
            scratch, inputs
        )
    except BaseException:
        scratch.cleanup()
        raise


def _plan(
    config: MergeConfig,
    root: Path,
    refs: dict[str, ModelRef],
    settings: tokenizer.TokenizerSettings,
    folder: ModelFolder,
    device: str,
    uniform_kwargs: Callable,
) -> Prepared:
    assert folder.tokenizer_dir is not None
    dirs = {key: ref.folder for key, ref in refs.items()}
    try:
        vocab = tokenizer.plan_vocabulary(settings, dirs, config.base_model, folder.tokenizer_dir)
    except (ValueError, OSError) as exc:
        raise mb.MergeError(f"tokenizer: {exc}") from None
    if is_uniform(config, settings):
        return Prepared(folder, kwargs=uniform_kwargs(config, root))
    method = mb.get_method(config.merge_method)
    _check_routable(method)
    layouts = {key: architecture.layout(list(ref.source.keys())) for key, ref in refs.items()}
    slices = slices_of(config, layer_counts(layouts))
    reference = config.base_model or slices[0].sources[0].model
    routes = Planner(config, method, layouts).plan(slices, reference)
    if config.slices:
        folder.num_layers = sum(s.num_layers for s in slices)
    if vocab is not None:
        folder.vocab_size = vocab.vocab_size
    return Prepared(folder, plan=_routed_plan(config, method, refs, routes, vocab, device))


def _check_routable(method: mb.MergeMethod) -> None:
    why = None
    if not method.streaming:
        why = "merges whole models at once"
    elif method.needs - {mb.Need.BASE}:
        why = f"needs {', '.join(sorted(method.needs - {mb.Need.BASE}))}"
    if why:
        raise mb.MergeError(f"method '{method.name}' {why}; it cannot be used with slices, "
                            "gradients, filters, LoRA references or a tokenizer source")  # fmt: skip


def _routed_plan(
    config: MergeConfig,
    method: mb.MergeMethod,
    refs: dict[str, ModelRef],
    routes: list[Route],
    vocab: tokenizer.VocabPlan | None,
    device: str,
) -> MergePlan:
    base_ctx = mb.MergeContext(
        method=method.name, model_names=[], params=method.params_model.model_construct(),
        model_params=[], device=resolve_device(device),
        out_dtype=resolve_dtype(config.out_dtype or config.dtype),
        compute_dtype=compute_dtype(config), seed=config.seed,
    )  # fmt: skip
    contexts: dict[str, mb.MergeContext] = {}
    tensor_routes = []
    for route in routes:
        ctx = _context(method, base_ctx, route, refs, contexts)
        first_source, first_key = refs[route.inputs[0][0]].source, route.inputs[0][1]
        meta = first_source.metadata(first_key)
        transform = None
        if vocab is not None and architecture.is_vocab_tensor(route.out_name):
            transform = _vocab_transform(route, vocab)
            meta = TensorMeta(meta.dtype, (vocab.vocab_size, *tuple(meta.shape)[1:]))
        tensor_route = TensorRoute(
            key=route.out_name, meta=meta,
            inputs=[(refs[k].source, name) for k, name in route.inputs],
            base=(refs[route.base[0]].source, route.base[1]) if route.base else None,
            ctx=ctx, transform=transform,
        )  # fmt: skip
        check_route_shapes(tensor_route)
        tensor_routes.append(tensor_route)
    return MergePlan(
        method=method, ctx=base_ctx, models=[r.source for r in refs.values()], base=None,
        side={}, keys=[r.key for r in tensor_routes],
        metas={r.key: r.meta for r in tensor_routes}, routes=tensor_routes,
        description={"mergeops_method": method.name,
                     "mergeops_config": config.model_dump_json(exclude_defaults=True)},
    )  # fmt: skip


def _context(
    method: mb.MergeMethod,
    base_ctx: mb.MergeContext,
    route: Route,
    refs: dict[str, ModelRef],
    cache: dict[str, mb.MergeContext],
) -> mb.MergeContext:
    names = [refs[k].source.name for k, _ in route.inputs]
    signature = json.dumps([route.params, route.model_params, names, route.base is not None],
                           sort_keys=True, default=str)  # fmt: skip
    if signature in cache:
        return cache[signature]
    try:
        params, model_params = mb.split_params(method, route.params, route.model_params, names)
    except mb.MergeError as exc:
        raise mb.MergeError(f"tensor '{route.out_name}': {exc}") from None
    ctx = dataclasses.replace(base_ctx, model_names=names, params=params,
                              model_params=model_params, has_base=route.base is not None)  # fmt: skip
    method.validate(ctx)
    if isinstance(method, mb.StreamingMethod) and method.stats_collector(ctx) is not None:
        raise mb.MergeError(f"method '{method.name}' with these params needs a model-wide "
                            "statistics pass, which per-tensor routes do not support")  # fmt: skip
    cache[signature] = ctx
    return ctx


def _vocab_transform(route: Route, vocab: tokenizer.VocabPlan) -> Transform:
    keys = [k for k, _ in route.inputs] + ([route.base[0]] if route.base else [])
    base_key = route.base[0] if route.base else vocab.base_model

    def remap(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        mapped = remap_rows(dict(zip(keys, tensors, strict=True)), vocab, base_model=base_key)
        return [mapped[k] for k in keys]

    return remap
