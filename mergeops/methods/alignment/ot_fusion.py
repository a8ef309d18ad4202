"""ot_fusion — Transformer Fusion with Optimal Transport (Imfeld et al. 2024,
https://arxiv.org/abs/2310.05719; the MLP case is Singh & Jaggi 2020, arXiv 1910.05653).

Models that share no base are merged by aligning every other model to the first one, layer
by layer in forward order: a transport plan T between the reference's neurons and model k's
(cost: squared distance of their activations on shared inputs, or of their incoming weights
after the previous layer's alignment), exact (Hungarian, a permutation) or entropic
(Sinkhorn, soft). Model k's outgoing rows become n·T·rows, the next layer's incoming columns
cols·(n·T)ᵀ; then all models are averaged. Features come from a ``FeatureProbe`` passed as the
objective. Supported: MLP chains, and Llama-style transformers through a probe that declares
the residual stream as one layer (a single map for every block) and attention heads as
layers moved in blocks of the head dim (``NeuronLayer.group``; see ``bench.lmzoo.features``).
The ``weight`` cost needs chained layers with a weight (MLPs).
"""

from __future__ import annotations

from typing import ClassVar, Literal

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
    activation_cost,
    expand_map,
    fuse,
    grouped,
    match_neurons,
    permutation_map,
    sinkhorn,
)
from mergeops.sources import FeatureProbe, NeuronLayer


class OtFusionParams(MethodParams):
    """``solver``: exact (a permutation) or sinkhorn (soft, entropic ``reg`` relative to the
    mean cost); ``cost``: activation or weight."""

    solver: Literal["exact", "sinkhorn"] = "exact"
    cost: Literal["activation", "weight"] = "activation"
    reg: float = Field(0.05, gt=0)
    iters: int = Field(300, ge=1)


def _weight_rows(model: Params, layer: NeuronLayer, prev: torch.Tensor | None) -> torch.Tensor:
    if layer.weight is None or layer.group != 1:
        raise MergeError(f"ot_fusion cost 'weight' needs a chain of layers with a weight; layer "
                         f"'{layer.name}' has none or moves in groups: use cost 'activation'")  # fmt: skip
    weight = model[layer.weight].double()
    if prev is not None:
        weight = weight @ prev.T
    if layer.bias is not None:
        weight = torch.cat([weight, model[layer.bias].double()[:, None]], dim=1)
    return weight


@register
class OtFusion(WholeModelMethod):
    """Optimal-transport alignment of every model to the first, then averaging."""

    name = "ot_fusion"
    paper = "https://arxiv.org/abs/2310.05719"
    params_model = OtFusionParams
    needs = frozenset({Need.OBJECTIVE})
    objective_kind: ClassVar[str] = "feature_probe"

    def validate(self, ctx: MergeContext) -> None:
        require_probe(ctx)

    def merge_model(self, inputs: ModelInputs, ctx: MergeContext) -> ModelResult:
        params = ctx.params
        assert isinstance(params, OtFusionParams)
        probe = require_probe(ctx)
        models = load_models(inputs, ctx)
        layers = probe.layer_order()
        check_layers(models, ctx.model_names, layers)
        maps = ot_maps(models, list(ctx.model_names), layers, probe, params)
        ctx.scratch["alignment_maps"] = maps
        return ModelResult(fuse(models, layers, maps))


def ot_maps(
    models: list[Params],
    names: list[str],
    layers: list[NeuronLayer],
    probe: FeatureProbe,
    params: OtFusionParams,
) -> dict[str, list[torch.Tensor]]:
    """Per layer, the maps n·T_k of every model onto the reference (model 0)."""
    maps: dict[str, list[torch.Tensor]] = {}
    prev: list[torch.Tensor] | None = None
    for layer in layers:
        g = layer.group
        if params.cost == "activation":
            feats = [grouped(f, g) for f in layer_features(probe, models, names, layer)]
            costs = [activation_cost(feats[0], f) for f in feats]
        else:
            rows = [
                _weight_rows(m, layer, None if prev is None else prev[k])
                for k, m in enumerate(models)
            ]
            costs = [torch.cdist(rows[0], r).pow(2) for r in rows]
        blocks = costs[0].shape[0]
        layer_maps = [torch.eye(blocks * g, dtype=torch.float64)]
        for cost in costs[1:]:
            if params.solver == "exact":
                block_map = permutation_map(match_neurons(-cost))
            else:
                block_map = blocks * sinkhorn(cost, params.reg, params.iters)
            layer_maps.append(expand_map(block_map, g))
        maps[layer.name] = layer_maps
        prev = layer_maps
    return maps
