"""Expert-aware metadata: when a checkpoint completes, record its MoE layout (if it has one).

The summary (architecture, MoE layers, experts per layer and per token, shared experts, layers
whose router is missing) goes under ``metadata["moe"]``, so ``GET /checkpoints/{id}`` says how
many experts each layer has. An MoE built from registered experts (``ckreg moe build``) names them
in ``metadata["moe_experts"]`` (checkpoint ids): they are checked with the files and linked as
lineage parents (role ``input``) when the checkpoint completes.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlmodel import Session

from mergeops.moe.layout import detect_moe
from registry.errors import InvalidInput
from registry.models import Checkpoint, CheckpointStatus, LineageCreate, LineageRole
from registry.safetensors_check import SafetensorsHeader
from registry.services.lineage import add_lineage_edges

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


# --- lineage of an MoE built from experts ---------------------------------------------------------

MOE_EXPERTS_KEY = "moe_experts"


def _expert_ids(checkpoint: Checkpoint) -> list[int]:
    ids = (checkpoint.meta or {}).get(MOE_EXPERTS_KEY)
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise InvalidInput(
            f"metadata '{MOE_EXPERTS_KEY}' must be a list of checkpoint ids; got {ids!r}"
        )
    return ids


def check_moe_experts(*, session: Session, checkpoint: Checkpoint) -> None:
    """Every id in ``metadata["moe_experts"]`` names another ready checkpoint (else InvalidInput)."""
    for expert_id in _expert_ids(checkpoint):
        expert = session.get(Checkpoint, expert_id)
        if expert is None or expert_id == checkpoint.id or expert.status != CheckpointStatus.ready:
            state = (
                "itself"
                if expert_id == checkpoint.id
                else "missing"
                if expert is None
                else expert.status
            )
            raise InvalidInput(
                f"metadata '{MOE_EXPERTS_KEY}' of checkpoint '{checkpoint.name}': expert checkpoint {expert_id} is {state}"
            )


def link_moe_experts(*, session: Session, checkpoint: Checkpoint) -> None:
    """Lineage edges (role ``input``) from each expert checkpoint to the MoE built from them."""
    edges = [
        LineageCreate(parent_id=expert_id, child_id=checkpoint.id or 0, role=LineageRole.input)
        for expert_id in _expert_ids(checkpoint)
    ]
    if edges:
        add_lineage_edges(session=session, edges=edges)
