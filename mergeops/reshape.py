"""Output shapes of whole-model methods that write another architecture than their inputs'.

A ``WholeModelMethod`` may declare, through ``output_shapes(metas, ctx)``, shapes that differ
from the inputs' (PLeaS at ``width_factor`` > 1 writes wider layers,
https://arxiv.org/abs/2407.02447). ``output_metas`` checks the declaration against the plan
and gives every output tensor's name, dtype and shape; the engine checks ``merge_model``'s
tensors against these rather than the inputs' shapes. ``neuron_layer_shapes`` is the shape
rule of layers of neurons (``NeuronLayer``): rows (dim 0) and columns (dim 1) of a layer
take its new width.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.sources import NeuronLayer, TensorMeta


def output_metas(plan: MergePlan) -> dict[str, TensorMeta]:
    """The plan's output tensors with the shapes the method declares (``plan.metas`` when it
    declares none); ``MergeError`` naming a declared tensor the output does not have or a
    shape that is no tuple of positive sizes."""
    method = plan.method
    if not isinstance(method, mb.WholeModelMethod):
        return plan.metas
    declared = method.output_shapes(plan.metas, plan.ctx)
    if not declared:
        return plan.metas
    metas = dict(plan.metas)
    for key, shape in declared.items():
        if key not in metas:
            raise mb.MergeError(
                f"method '{method.name}' declares an output shape for '{key}', which is not a "
                "tensor of the inputs"
            )
        if not all(isinstance(n, int) and n > 0 for n in shape):
            raise mb.MergeError(
                f"method '{method.name}' declares shape {tuple(shape)!r} for '{key}'; "
                "expected positive sizes"
            )
        metas[key] = TensorMeta(metas[key].dtype, tuple(shape))
    return metas


def neuron_layer_shapes(
    metas: Mapping[str, TensorMeta], layers: Iterable[NeuronLayer], widths: Mapping[str, int]
) -> dict[str, tuple[int, ...]]:
    """Shapes after layer ``name`` takes width ``widths[name]``: dim 0 of its ``rows`` and
    dim 1 of its two-dimensional ``cols`` (layers not in ``widths`` keep theirs)."""
    shapes = {key: tuple(meta.shape) for key, meta in metas.items()}
    changed: set[str] = set()
    for layer in layers:
        width = widths.get(layer.name)
        if width is None:
            continue
        for key in layer.rows:
            shapes[key] = (width, *shapes[_known(shapes, key, layer)][1:])
            changed.add(key)
        for key in layer.cols:
            shape = shapes[_known(shapes, key, layer)]
            if len(shape) == 2:
                shapes[key] = (shape[0], width)
                changed.add(key)
    return {key: shapes[key] for key in sorted(changed)}


def _known(shapes: Mapping[str, tuple[int, ...]], key: str, layer: NeuronLayer) -> str:
    if key not in shapes:
        raise mb.MergeError(f"layer '{layer.name}' names '{key}', which the models do not have")
    return key
