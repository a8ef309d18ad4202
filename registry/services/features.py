"""``features`` artifacts: per-layer activations of a checkpoint on shared unlabeled inputs, for
the alignment methods (pleas, ot_fusion) when the evaluator gives no feature probe.

The safetensors file holds one (samples, width) tensor per layer, named by the layer, and in
its metadata ``ckreg.features`` the layers in forward order as JSON:
``[{"name", "weight", "bias", "rows", "cols", "group", "widen"}]`` (``registry.client.capture_features``
writes it). On upload every layer is checked against the checkpoint's weights: the tensors it
names exist, and its features are 2-D with the layer's width and one sample count throughout.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session

from registry.errors import InvalidInput, InvalidState, ValidationFailed
from registry.models import ArtifactRole, CheckpointStatus
from registry.safetensors_check import SafetensorsHeader
from registry.services.common import load_checkpoint
from registry.services.compatibility import tensor_shapes

FEATURES_KEY = "ckreg.features"


class FeatureLayerSpec(BaseModel):
    """One layer of neurons: ``weight``/``bias`` produce them, ``rows`` are the tensors whose
    dim 0 indexes them, ``cols`` those whose dim 1 does; ``group``: neurons move in blocks;
    ``widen`` False: a wider pleas merge keeps the layer's width."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    weight: str | None = None
    bias: str | None = None
    rows: tuple[str, ...] = ()
    cols: tuple[str, ...] = ()
    group: int = Field(default=1, ge=1)
    widen: bool = True

    def tensors(self) -> list[str]:
        return [t for t in (self.weight, self.bias) if t] + [*self.rows, *self.cols]


def parse_layers(metadata: dict[str, str], *, file: str) -> list[FeatureLayerSpec]:
    """The layers a features file declares (``ValidationFailed`` naming the file)."""
    raw = metadata.get(FEATURES_KEY)
    if raw is None:
        raise ValidationFailed(
            f"file '{file}': no '{FEATURES_KEY}' metadata listing the layers "
            "(write it with registry.client.capture_features.save_features)",
            file=file,
        )
    try:
        layers = [FeatureLayerSpec.model_validate(item) for item in json.loads(raw)]
    except (ValueError, TypeError, ValidationError) as exc:
        brief = " ".join(str(exc).split())[:300]
        raise ValidationFailed(f"file '{file}': bad '{FEATURES_KEY}' metadata: {brief}",
                               file=file) from None  # fmt: skip
    if not layers:
        raise ValidationFailed(f"file '{file}': '{FEATURES_KEY}' lists no layers", file=file)
    return layers


def check_features(
    session: Session, checkpoint_id: int, header: SafetensorsHeader, name: str
) -> None:
    """Refuse a features file that does not fit the checkpoint's weights."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status != CheckpointStatus.ready:
        raise InvalidState(f"checkpoint {checkpoint_id} '{checkpoint.name}' is "
                           f"{checkpoint.status}; cannot add a features artifact")  # fmt: skip
    weights = tensor_shapes(session, checkpoint)
    layers = parse_layers(header.metadata, file=name)
    declared = {layer.name for layer in layers}
    for tensor in header.tensors:
        if tensor not in declared:
            raise ValidationFailed(f"file '{name}', tensor '{tensor}': not a layer listed in "
                                   f"'{FEATURES_KEY}'", file=name, tensor=tensor)  # fmt: skip
    samples: int | None = None
    for layer in layers:
        samples = _check_layer(layer, weights, header, name, checkpoint_id, samples)


def _check_layer(
    layer: FeatureLayerSpec,
    weights: dict[str, tuple[int, ...]],
    header: SafetensorsHeader,
    name: str,
    checkpoint_id: int,
    samples: int | None,
) -> int:
    for tensor in layer.tensors():
        if tensor not in weights:
            raise ValidationFailed(f"file '{name}', layer '{layer.name}': '{tensor}' is not a "
                                   f"weight of checkpoint {checkpoint_id}", file=name,
                                   tensor=tensor)  # fmt: skip
    if layer.weight is None and not layer.rows:
        raise ValidationFailed(f"file '{name}', layer '{layer.name}': names no weight and no "
                               "rows", file=name, tensor=layer.name)  # fmt: skip
    width = weights[layer.weight or layer.rows[0]][0]
    entry = header.tensors.get(layer.name)
    shape: Any = tuple(entry.shape) if entry is not None else None
    if shape is None or len(shape) != 2 or shape[1] != width or shape[0] < 1:
        raise ValidationFailed(f"file '{name}', tensor '{layer.name}': features shape {shape}, "
                               f"expected (samples, {width})", file=name,
                               tensor=layer.name)  # fmt: skip
    if samples is not None and shape[0] != samples:
        raise ValidationFailed(f"file '{name}', tensor '{layer.name}': {shape[0]} samples, the "
                               f"other layers have {samples}", file=name,
                               tensor=layer.name)  # fmt: skip
    return int(shape[0])


def check_feature_inputs(
    *, session: Session, method: str, params: dict[str, Any], evaluator: str | None,
    input_ids: list[int],
) -> None:  # fmt: skip
    """An ad-hoc pleas/ot_fusion merge without an evaluator runs on stored features: refuse
    it up front (``InvalidInput``, 422) when an input has no ``features`` artifact, or when
    pleas's least-squares step (which needs an evaluator probe) is asked for."""
    from mergeops.methods import base as methods_base
    from registry.services.artifacts import find_artifact

    try:
        kind = getattr(methods_base.get_method(method), "objective_kind", None)
    except methods_base.MergeError:
        return  # an unknown method is refused elsewhere
    if kind != "feature_probe" or evaluator is not None:
        return
    if method == "pleas" and params.get("least_squares", True):
        raise InvalidInput(
            "method 'pleas' without an evaluator runs on stored features, and its "
            "least-squares step needs an evaluator's feature_probe(): give an 'evaluator' or "
            "set params.least_squares to false"
        )
    for checkpoint_id in input_ids:
        if find_artifact(session=session, checkpoint_id=checkpoint_id,
                         role=ArtifactRole.features) is None:  # fmt: skip
            checkpoint = load_checkpoint(session, checkpoint_id)
            raise InvalidInput(
                f"method '{method}' needs features: checkpoint {checkpoint_id} "
                f"'{checkpoint.name}' has no 'features' artifact (ckreg register --features) "
                "and the merge names no evaluator with a feature_probe()"
            )
