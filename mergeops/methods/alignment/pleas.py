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

Features come from a ``FeatureProbe`` passed as the objective. The merge engine writes the
input architecture, so through ``merge``/``merge_files`` the width stays the models' own;
``pleas_merge`` (in memory) returns wider models. Supported: MLP chains (all three steps);
Llama-style transformers (residual stream, heads, MLP blocks) get steps 1-2 only: layers
without a single producing ``weight`` are permuted and averaged, not solved.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from mergeops.methods.alignment._common import (
    Params,
    check_layers,
    layer_features,
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
    mapped_targets,
    match_neurons,
    partial_match_maps,
    permutation_map,
    preactivation,
)
from mergeops.sources import FeatureProbe, NeuronLayer


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
        params = ctx.params
        assert isinstance(params, PleasParams)
        if params.width_factor != 1.0:
            raise MergeError(
                f"pleas width_factor {params.width_factor}: the merge engine writes the "
                "models' own architecture, so only 1.0 is accepted here; use "
                "mergeops.methods.alignment.pleas.pleas_merge for a wider merge in memory"
            )

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
    """The PLeaS merge of in-memory ``models`` (any ``width_factor`` in [1, 2] for two)."""
    params = params or PleasParams.model_validate({})
    names = names or [f"model-{k}" for k in range(len(models))]
    if params.width_factor != 1.0 and len(models) != 2:
        raise MergeError(f"pleas width_factor > 1 needs exactly 2 models, got {len(models)}")
    layers = probe.layer_order()
    check_layers(models, names, layers)
    if params.width_factor != 1.0 and any(layer.group != 1 for layer in layers):
        raise MergeError("pleas width_factor > 1 is for layers of single neurons, not groups")
    maps = {
        layer.name: [
            expand_map(m, layer.group)
            for m in _layer_maps(
                [grouped(f, layer.group) for f in layer_features(probe, models, names, layer)],
                params.width_factor,
            )
        ]
        for layer in layers
    }
    merged = fuse(models, layers, maps)
    if params.least_squares:
        _solve_layers(merged, models, layers, maps, probe, params.ridge)
    return merged


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
