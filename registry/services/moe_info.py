"""Expert-aware metadata: when a checkpoint completes, record its MoE layout (if it has one).

The summary (architecture, MoE layers, experts per layer and per token, shared experts, layers
whose router is missing) goes under ``metadata["moe"]``, so ``GET /checkpoints/{id}`` says how
many experts each layer has.
"""

from __future__ import annotations

from collections.abc import Mapping

from mergeops.moe.layout import detect_moe
from registry.models import Checkpoint
from registry.safetensors_check import SafetensorsHeader

MOE_METADATA_KEY = "moe"


def moe_summary(headers: Mapping[str, SafetensorsHeader]) -> dict | None:
    """The MoE layout summary of a checkpoint's safetensors headers, or None when dense."""
    shapes = {
        name: list(entry.shape)
        for header in headers.values()
        for name, entry in header.tensors.items()
    }
    layout = detect_moe(shapes)
    return layout.summary() if layout is not None else None


def annotate_moe(*, checkpoint: Checkpoint, headers: Mapping[str, SafetensorsHeader]) -> None:
    """Put the MoE summary into the checkpoint's metadata (the caller commits)."""
    summary = moe_summary(headers)
    if summary is not None:
        checkpoint.meta = {**(checkpoint.meta or {}), MOE_METADATA_KEY: summary}
