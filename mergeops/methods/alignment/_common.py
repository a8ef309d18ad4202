"""Checks and loading shared by the alignment methods (pleas, ot_fusion)."""

from __future__ import annotations

import torch

from mergeops.methods.base import MergeContext, MergeError, ModelInputs, load_state_dict
from mergeops.sources import FeatureProbe, NeuronLayer

Params = dict[str, torch.Tensor]


def require_probe(ctx: MergeContext) -> FeatureProbe:
    """The feature probe passed as the objective, or a ``MergeError`` saying what is missing."""
    if not isinstance(ctx.objective, FeatureProbe):
        raise MergeError(
            f"method '{ctx.method}' needs features: pass a feature probe as the objective "
            "(an object with layer_order(), features(params, layer) and "
            f"layer_inputs(params, layer)); got {type(ctx.objective).__name__}"
        )
    if len(ctx.model_names) < 2:
        raise MergeError(f"method '{ctx.method}' needs at least 2 models")
    return ctx.objective


def load_models(inputs: ModelInputs, ctx: MergeContext) -> list[Params]:
    """Every model as a float32 state dict on the context's device."""
    return [load_state_dict(source, ctx.device) for source in inputs.models]


def layer_width(model: Params, layer: NeuronLayer) -> int:
    """How many neurons ``layer`` has in ``model`` (its first row tensor's dim 0)."""
    return int(model[layer.weight or layer.rows[0]].shape[0])


def check_layers(models: list[Params], names: list[str], layers: list[NeuronLayer]) -> None:
    """Every layer's tensors exist in every model with matching neuron dimensions."""
    if not layers:
        raise MergeError("the feature probe names no layers to align")
    for model, name in zip(models, names, strict=True):
        for layer in layers:
            if not layer.rows and layer.weight is None:
                raise MergeError(f"layer '{layer.name}' names no weight and no row tensors")
            for key in (*([layer.weight] if layer.weight else []), *layer.rows, *layer.cols):
                if key not in model:
                    raise MergeError(f"layer '{layer.name}': model '{name}' has no '{key}'")
            width = layer_width(model, layer)
            if layer.group < 1 or width % layer.group:
                raise MergeError(f"layer '{layer.name}': width {width} is not a multiple of "
                                 f"its group {layer.group}")  # fmt: skip
            for key, dim in [(k, 0) for k in layer.rows] + [(k, 1) for k in layer.cols]:
                tensor = model[key]
                if tensor.dim() <= dim or tensor.shape[dim] != width:
                    raise MergeError(
                        f"layer '{layer.name}' of model '{name}': '{key}' has shape "
                        f"{tuple(tensor.shape)}, dim {dim} should be the layer width {width}"
                    )


def layer_features(
    probe: FeatureProbe, models: list[Params], names: list[str], layer: NeuronLayer
) -> list[torch.Tensor]:
    """Each model's (samples, width) features of ``layer``, checked against its weight."""
    out = []
    for model, name in zip(models, names, strict=True):
        feats = probe.features(model, layer.name)
        width = layer_width(model, layer)
        if feats.dim() != 2 or feats.shape[1] != width:
            raise MergeError(
                f"features of layer '{layer.name}' for model '{name}' have shape "
                f"{tuple(feats.shape)}, expected (samples, {width})"
            )
        if not bool(torch.isfinite(feats).all()):
            raise MergeError(f"features of layer '{layer.name}' for model '{name}' are not finite")
        out.append(feats)
    return out
