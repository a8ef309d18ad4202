"""pleas — PLeaS: Permutations and Least Squares (Nasery et al. 2024,
https://arxiv.org/abs/2407.02447), merging models that share no base.

1. Layer by layer, match each model's neurons to the first model's by the correlation of
   their activations on shared inputs (Hungarian). At a ``width_factor`` above 1 (two models
   only) just the 2n - m best pairs of the matching are merged and the other neurons of both
   models are kept, for m = round(n·width_factor) merged neurons, n ≤ m ≤ 2n.
2. Fuse through the matchings (matched rows averaged, incoming columns mapped).
3. In forward order, replace each layer's weight and bias by the least-squares solution that
   maps the merged model's own inputs to that layer (earlier layers already solved) onto the
   average of the matched models' pre-activations (``least_squares: false`` skips this).

Features come from a ``FeatureProbe`` passed as the objective. A wider merge goes through
``merge``/``merge_files`` too: ``Pleas.output_shapes`` declares the wider tensors to the
engine (``mergeops.reshape``). Supported: MLP chains (all three steps);
Llama-style transformers (residual stream, heads, MLP blocks) too: no single weight produces
their layers, so a ``LinearUnitProbe`` lists the linear weights (q/k/v, o_proj, gate/up,
down_proj) with the layer whose map moves their rows, and step 3 re-solves each on the merged
model's own inputs, its ridge pulling towards the fused weight (embeddings, norms and the head
stay permuted and averaged). A wider merge widens only layers with ``widen`` (a Llama's MLP
blocks); ``pleas_output_widths`` gives the new widths (``intermediate_size``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from pydantic import Field

from mergeops.methods.alignment._common import (
    Params,
    check_layers,
    layer_features,
    layer_width,
    load_models,
    require_probe,
)
from mergeops.methods.base import (
    MergeContext,
    MergeError,
    MethodParams,
    ModelInputs,
    ModelResult,
    Need,
    WholeModelMethod,
    register,
)
from mergeops.ops.alignment import (
    correlation,
    expand_map,
    fuse,
    grouped,
    least_squares_layer,
    linear_output,
    mapped_targets,
    match_neurons,
    partial_match_maps,
    permutation_map,
    preactivation,
    relative_error,
)
from mergeops.reshape import neuron_layer_shapes
from mergeops.sources import FeatureProbe, LinearUnitProbe, NeuronLayer, TensorMeta


class PleasParams(MethodParams):
    """``width_factor`` (1 to 2): merged width over model width; ``least_squares``: run step
    3; ``ridge``: its regularisation (relative to the sample count)."""

    width_factor: float = Field(1.0, ge=1.0, le=2.0)
    least_squares: bool = True
    ridge: float = Field(1e-6, ge=0)


@register
class Pleas(WholeModelMethod):
    """Permutation matching, then per-layer least squares on the merged model's inputs."""

    name = "pleas"
    paper = "https://arxiv.org/abs/2407.02447"
    params_model = PleasParams
    needs = frozenset({Need.OBJECTIVE})
    objective_kind: ClassVar[str] = "feature_probe"

    def validate(self, ctx: MergeContext) -> None:
        require_probe(ctx)
        self.check_model_count(ctx.params, len(ctx.model_names))

    def check_model_count(self, params: MethodParams, count: int) -> None:
        assert isinstance(params, PleasParams)
        if params.width_factor != 1.0 and count != 2:
            raise MergeError(f"pleas width_factor {params.width_factor}: a wider merge takes "
                             f"exactly 2 models, got {count}")  # fmt: skip

    def output_shapes(
        self, metas: Mapping[str, TensorMeta], ctx: MergeContext
    ) -> dict[str, tuple[int, ...]] | None:
        """At ``width_factor`` > 1 each widened layer of n neurons has round(n·factor)."""
        params = ctx.params
        assert isinstance(params, PleasParams)
        if params.width_factor == 1.0:
            return None
        layers = require_probe(ctx).layer_order()
        shapes = {key: tuple(meta.shape) for key, meta in metas.items()}
        return neuron_layer_shapes(metas, layers, _widened(shapes, layers, params.width_factor))

    def merge_model(self, inputs: ModelInputs, ctx: MergeContext) -> ModelResult:
        params = ctx.params
        assert isinstance(params, PleasParams)
        probe = require_probe(ctx)
        models = load_models(inputs, ctx)
        merged = pleas_merge(models, probe, params, names=list(ctx.model_names))
        return ModelResult(merged)


def pleas_merge(
    models: list[Params],
    probe: FeatureProbe,
    params: PleasParams | None = None,
    *,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The PLeaS merge of in-memory ``models`` (any ``width_factor`` in [1, 2] for two;
    layers with ``widen`` False keep their width)."""
    params = params or PleasParams.model_validate({})
    layers = probe.layer_order()
    maps = pleas_maps(models, probe, params, names=names)
    merged = fuse(models, layers, maps)
    if params.least_squares:
        if isinstance(probe, LinearUnitProbe):
            _solve_units(merged, models, maps, probe, params.ridge)
        else:
            _solve_layers(merged, models, layers, maps, probe, params.ridge)
    return merged


def pleas_maps(
    models: list[Params],
    probe: FeatureProbe,
    params: PleasParams,
    *,
    names: list[str] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """Steps 1's maps: per layer, each model's (merged width x width) map onto the merge."""
    names = names or [f"model-{k}" for k in range(len(models))]
    if params.width_factor != 1.0 and len(models) != 2:
        raise MergeError(f"pleas width_factor > 1 needs exactly 2 models, got {len(models)}")
    layers = probe.layer_order()
    check_layers(models, names, layers)
    for layer in layers:
        if params.width_factor != 1.0 and layer.widen and layer.group != 1:
            raise MergeError(f"pleas width_factor > 1: layer '{layer.name}' moves in groups of "
                             f"{layer.group}; only layers of single neurons can be widened")  # fmt: skip
    return {
        layer.name: [
            expand_map(m, layer.group)
            for m in _layer_maps(
                [grouped(f, layer.group) for f in layer_features(probe, models, names, layer)],
                params.width_factor if layer.widen else 1.0,
            )
        ]
        for layer in layers
    }


def pleas_output_widths(
    model: Params, layers: list[NeuronLayer], width_factor: float
) -> dict[str, int]:
    """Each layer's width in a pleas merge of two models like ``model`` at ``width_factor``
    (a Llama's new ``intermediate_size`` is the width of ``mlp.0``)."""
    shapes = {key: tuple(tensor.shape) for key, tensor in model.items()}
    own = {layer.name: layer_width(model, layer) for layer in layers}
    return own | _widened(shapes, layers, width_factor)


def _widened(
    shapes: Mapping[str, tuple[int, ...]], layers: list[NeuronLayer], width_factor: float
) -> dict[str, int]:
    """The new width of every layer a wider merge widens (``widen``; a layer whose tensors the
    models lack is left out: the merge itself names it)."""
    widths = {}
    for layer in layers:
        key = layer.weight or (layer.rows[0] if layer.rows else "")
        if layer.widen and key in shapes:
            widths[layer.name] = round(shapes[key][0] * width_factor)
    return widths


def pleas_output_shapes(
    model: Params, layers: list[NeuronLayer], width_factor: float
) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in that merge (dim 0 of a layer's rows and its weight, dim 1 of its
    cols follow the layer's new width; other tensors keep theirs)."""
    shapes = {key: tuple(tensor.shape) for key, tensor in model.items()}
    metas = {key: TensorMeta(tensor.dtype, tuple(tensor.shape)) for key, tensor in model.items()}
    return shapes | neuron_layer_shapes(metas, layers, _widened(shapes, layers, width_factor))


def _layer_maps(feats: list[torch.Tensor], width_factor: float) -> list[torch.Tensor]:
    width = feats[0].shape[1]
    if width_factor != 1.0:
        target = round(width * width_factor)
        return list(partial_match_maps(correlation(feats[0], feats[1]), target))
    maps = [torch.eye(width, dtype=torch.float64)]
    maps += [permutation_map(match_neurons(correlation(feats[0], f))) for f in feats[1:]]
    return maps


def _solve_layers(
    merged: dict[str, torch.Tensor],
    models: list[Params],
    layers: list[NeuronLayer],
    maps: dict[str, list[torch.Tensor]],
    probe: FeatureProbe,
    ridge: float,
) -> None:
    """Step 3, in forward order: each layer reproduces its matched pre-activations."""
    for layer in layers:
        if layer.weight is None:  # a residual stream: permutation only
            continue
        preacts = [preactivation(m, layer, probe.layer_inputs(m, layer.name)) for m in models]
        targets = mapped_targets(preacts, maps[layer.name])
        inputs = probe.layer_inputs(merged, layer.name)
        weight, bias = least_squares_layer(
            inputs, targets, bias=layer.bias is not None, ridge=ridge
        )
        merged[layer.weight] = weight
        if layer.bias is not None and bias is not None:
            merged[layer.bias] = bias


def _unit_targets(
    models: list[Params],
    maps: dict[str, list[torch.Tensor]],
    probe: LinearUnitProbe,
) -> dict[str, torch.Tensor]:
    """Per unit weight, the mapped average of the models' outputs, each on its own inputs."""
    units = probe.linear_units()
    sources = list(dict.fromkeys(u.source for u in units))
    own = [probe.unit_inputs(m, sources) for m in models]  # one forward per model
    return {
        u.weight: mapped_targets(
            [
                linear_output(x[u.source], m[u.weight], m[u.bias] if u.bias else None)
                for m, x in zip(models, own, strict=True)
            ],
            maps[u.layer],
        )
        for u in units
    }


def _solve_units(
    merged: dict[str, torch.Tensor],
    models: list[Params],
    maps: dict[str, list[torch.Tensor]],
    probe: LinearUnitProbe,
    ridge: float,
) -> None:
    """Step 3 for transformers, in forward order: each unit, on the merged model's inputs
    (earlier units solved), reproduces the mapped average of the models' outputs; the ridge
    pulls towards the fused weight. One forward of the merged model per input source."""
    targets = _unit_targets(models, maps, probe)
    units = probe.linear_units()
    for source in dict.fromkeys(u.source for u in units):
        inputs = probe.unit_inputs(merged, [source])[source]
        for unit in (u for u in units if u.source == source):
            prior = (merged[unit.weight], merged[unit.bias] if unit.bias else None)
            weight, bias = least_squares_layer(
                inputs, targets[unit.weight], bias=unit.bias is not None, ridge=ridge, prior=prior
            )
            merged[unit.weight] = weight
            if unit.bias is not None and bias is not None:
                merged[unit.bias] = bias


def unit_errors(
    merged: Params,
    models: list[Params],
    maps: dict[str, list[torch.Tensor]],
    probe: LinearUnitProbe,
) -> dict[str, float]:
    """Per unit weight, the merged model's relative error (on its own inputs) against the
    mapped average of the models' outputs: what step 3 minimises."""
    targets = _unit_targets(models, maps, probe)
    units = probe.linear_units()
    inputs = probe.unit_inputs(merged, list(dict.fromkeys(u.source for u in units)))
    return {
        u.weight: relative_error(
            linear_output(inputs[u.source], merged[u.weight], merged[u.bias] if u.bias else None),
            targets[u.weight],
        )
        for u in units
    }
