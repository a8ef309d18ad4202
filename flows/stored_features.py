"""A ``FeatureProbe`` from stored ``features`` artifacts, for pleas and ot_fusion when the
evaluator gives no ``feature_probe()`` (``registry.services.features`` describes the file).

The probe knows each input checkpoint's features per layer. Alignment methods ask for the
features of a model by its parameters; the probe recognises an input by one of the layer's
tensors (compared exactly after the same float32 load the methods do). It cannot compute
anything for a model it has not seen: pleas's least-squares step needs the merged model's
layer inputs, so with stored features pleas runs with ``least_squares: false`` only (refused
up front otherwise), and ot_fusion runs in full.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from sqlmodel import Session

from mergeops.io import open_source
from mergeops.methods import base as mb
from mergeops.sources import NeuronLayer
from registry.errors import InvalidInput
from registry.models import ArtifactRole, Checkpoint
from registry.services.features import FEATURES_KEY, parse_layers
from registry.storage import ObjectStore

Params = Mapping[str, torch.Tensor]


class StoredFeatureProbe:
    """``layer_order()`` and ``features()`` of the input checkpoints from their artifacts."""

    def __init__(self, layers: list[NeuronLayer], models: list[tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> None:  # fmt: skip
        # models: (name, {layer: features}, {tensor: float32 reference to recognise it by})
        self.layers, self.models = layers, models

    def layer_order(self) -> list[NeuronLayer]:
        return list(self.layers)

    def _which(self, params: Params, layer: str) -> tuple[str, dict[str, torch.Tensor]]:
        for name, feats, refs in self.models:
            key, ref = next(iter(refs.items()))
            tensor = params.get(key)
            if (
                tensor is not None
                and tensor.shape == ref.shape
                and torch.equal(tensor.detach().cpu().float(), ref)
            ):
                return name, feats
        raise mb.MergeError(
            f"stored features of layer '{layer}' cover the input checkpoints only, not this "
            "model (pleas's least-squares step needs the evaluator's feature_probe(); "
            "set least_squares: false to merge with stored features)"
        )

    def features(self, params: Params, layer: str) -> torch.Tensor:
        _, feats = self._which(params, layer)
        return feats[layer]

    def layer_inputs(self, params: Params, layer: str) -> torch.Tensor:
        self._which(params, layer)
        raise mb.MergeError(
            f"layer '{layer}': stored features hold no layer inputs; pleas's least-squares "
            "step needs the evaluator's feature_probe() (or least_squares: false)"
        )


def needs_stored_features(method: mb.MergeMethod, evaluator: Any | None) -> bool:
    """True when ``method`` takes a feature probe and the evaluator offers none."""
    kind = getattr(method, "objective_kind", None)
    return kind == "feature_probe" and getattr(evaluator, "feature_probe", None) is None


def stored_probe(
    *,
    session: Session,
    store: ObjectStore,
    cache_dir: Path,
    checkpoints: Sequence[Checkpoint],
    models: Sequence[Any],
    method: str,
    params: Mapping[str, Any],
) -> StoredFeatureProbe:
    """The probe over ``checkpoints`` (whose weights ``models`` are paths or sources, in the
    same order); ``InvalidInput`` naming the checkpoint without a ``features`` artifact."""
    from flows.inputs import artifact_file

    if method == "pleas" and params.get("least_squares", True):
        raise InvalidInput(
            "method 'pleas' with stored features: the least-squares step needs the evaluator's "
            "feature_probe(); give an evaluator with one, or set least_squares: false"
        )
    layers: list[NeuronLayer] | None = None
    entries = []
    for checkpoint, model in zip(checkpoints, models, strict=True):
        what = f"checkpoint {checkpoint.id} '{checkpoint.name}'"
        path = artifact_file(session=session, store=store, checkpoint_id=checkpoint.id or 0,
                             role=ArtifactRole.features, cache_dir=cache_dir)  # fmt: skip
        if path is None:
            raise InvalidInput(
                f"method '{method}' needs features: {what} has no 'features' artifact "
                "(ckreg register --features FILE) and the evaluator gives no feature_probe()"
            )
        theirs, feats = _read(path, what)
        if layers is not None and theirs != layers:
            raise InvalidInput(f"{what}: its features list other layers than the first input's")
        layers = theirs
        key = theirs[0].weight or theirs[0].rows[0]
        ref = open_source(model).get(key).float()
        entries.append((what, feats, {key: ref}))
    assert layers is not None
    return StoredFeatureProbe(layers, entries)


def _read(path: Path, what: str) -> tuple[list[NeuronLayer], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        specs = parse_layers(metadata, file=f"features of {what}")
        feats = {spec.name: handle.get_tensor(spec.name).float() for spec in specs}
    layers = [NeuronLayer(s.name, s.weight, s.bias, tuple(s.rows), tuple(s.cols), s.group,
                          s.widen) for s in specs]  # fmt: skip
    assert FEATURES_KEY in metadata
    return layers, feats


def merge_objective(prepared: Any, method: mb.MergeMethod) -> Any:
    """The objective of a merge run's method: the evaluator's (by the method's objective kind),
    or for pleas/ot_fusion without an evaluator probe the stored features' probe."""
    from flows.evaluators import load_evaluator
    from flows.merge_flow import evaluator_objective
    from flows.runtime import current_runtime
    from registry.services import merge_runs as run_service
    from registry.services.common import load_checkpoint

    evaluator = load_evaluator(prepared.evaluator) if prepared.evaluator else None
    if not needs_stored_features(method, evaluator):
        return evaluator_objective(prepared.evaluator, method) if prepared.evaluator else None
    runtime = current_runtime()
    with runtime.session() as session:
        inputs = run_service.merge_run_inputs(session=session, run_id=prepared.run_id)
        checkpoints = [load_checkpoint(session, i.checkpoint_id) for i in inputs]
        return stored_probe(session=session, store=runtime.store,
                            cache_dir=prepared.work_dir / "features", checkpoints=checkpoints,
                            models=prepared.models, method=method.name,
                            params=prepared.params)  # fmt: skip
