"""Expert-aware metadata: when a checkpoint completes, record its MoE layout (if it has one).

The summary (architecture, MoE layers, experts per layer and per token, shared experts, layers
whose router is missing) goes under ``metadata["moe"]``, so ``GET /checkpoints/{id}`` says how
many experts each layer has, and each MoE tensor's role (``{"layer", "role": router|expert|experts|
shared, "expert"?}``) is stored on its entry of the file's tensor index (``Artifact.tensor_index``,
key ``"moe"``; read back with ``moe_tensor_roles``). An MoE built from registered experts (``ckreg moe build``) names them
in ``metadata["moe_experts"]`` (checkpoint ids) and its dense base in ``metadata["moe_base"]``:
they are checked with the files and linked as lineage parents (roles ``input`` and ``base``) when
the checkpoint completes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlmodel import Session

from mergeops.moe.layout import MoeLayout, detect_moe
from registry.errors import InvalidInput
from registry.models import Artifact, Checkpoint, CheckpointStatus, LineageCreate, LineageRole
from registry.safetensors_check import SafetensorsHeader
from registry.services.common import checkpoint_files
from registry.services.lineage import add_lineage_edges

MOE_METADATA_KEY = "moe"


def _layout(headers: Mapping[str, SafetensorsHeader]) -> MoeLayout | None:
    shapes = {
        name: list(entry.shape)
        for header in headers.values()
        for name, entry in header.tensors.items()
    }
    return detect_moe(shapes)


def moe_summary(headers: Mapping[str, SafetensorsHeader]) -> dict | None:
    """The MoE layout summary of a checkpoint's safetensors headers, or None when dense."""
    layout = _layout(headers)
    return layout.summary() if layout is not None else None


def annotate_moe(
    *,
    checkpoint: Checkpoint,
    headers: Mapping[str, SafetensorsHeader],
    files: Iterable[Artifact] = (),
) -> None:
    """Put the MoE summary into the checkpoint's metadata and each MoE tensor's role into its
    file's tensor index entry (the caller commits; ``files`` already hold their index)."""
    layout = _layout(headers)
    if layout is None:
        return
    roles = layout.tensor_roles()
    counts: dict[str, int] = {}
    for role in roles.values():
        counts[role["role"]] = counts.get(role["role"], 0) + 1
    summary = {**layout.summary(), "tensors_by_role": counts}
    checkpoint.meta = {**(checkpoint.meta or {}), MOE_METADATA_KEY: summary}
    for artifact in files:
        index = artifact.tensor_index or {}
        if any(name in roles for name in index):
            # a new dict, so the JSON column is seen as changed
            artifact.tensor_index = {
                name: {**entry, TENSOR_ROLE_KEY: roles[name]} if name in roles else entry
                for name, entry in index.items()
            }


TENSOR_ROLE_KEY = "moe"


def moe_tensor_roles(session: Session, checkpoint_id: int) -> dict[str, dict[str, Any]]:
    """Tensor name -> its MoE role (``{"layer", "role", "expert"?}``) over a checkpoint's files,
    from the tensor index stored at ``complete`` ({} for a dense checkpoint)."""
    return {
        name: dict(entry[TENSOR_ROLE_KEY])
        for artifact in checkpoint_files(session, checkpoint_id)
        for name, entry in (artifact.tensor_index or {}).items()
        if isinstance(entry, Mapping) and TENSOR_ROLE_KEY in entry
    }


# --- lineage of an MoE built from experts ---------------------------------------------------------

MOE_EXPERTS_KEY = "moe_experts"
# the dense base an MoE was built on (its architecture differs, so it is not the base_id)
MOE_BASE_KEY = "moe_base"
# the MoE whose experts were merged into this one
MOE_SOURCE_KEY = "moe_compressed_from"


def _checkpoint_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _linked_ids(checkpoint: Checkpoint) -> list[tuple[int, LineageRole]]:
    """(checkpoint id, lineage role) named by the MoE metadata keys."""
    meta = checkpoint.meta or {}
    ids = meta.get(MOE_EXPERTS_KEY, [])
    if not isinstance(ids, list) or not all(_checkpoint_id(i) for i in ids):
        raise InvalidInput(
            f"metadata '{MOE_EXPERTS_KEY}' must be a list of checkpoint ids; got {ids!r}"
        )
    linked = [(int(i), LineageRole.input) for i in ids]
    for key, role in ((MOE_BASE_KEY, LineageRole.base), (MOE_SOURCE_KEY, LineageRole.input)):
        value = meta.get(key)
        if value is not None and not _checkpoint_id(value):
            raise InvalidInput(f"metadata '{key}' must be a checkpoint id; got {value!r}")
        if value is not None:
            linked.append((int(value), role))
    return linked


def check_moe_experts(*, session: Session, checkpoint: Checkpoint) -> None:
    """Every id in ``metadata["moe_experts"]`` / ``["moe_base"]`` / ``["moe_compressed_from"]``
    names another ready checkpoint (else InvalidInput naming it)."""
    for linked_id, role in _linked_ids(checkpoint):
        linked = session.get(Checkpoint, linked_id)
        if linked is None or linked_id == checkpoint.id or linked.status != CheckpointStatus.ready:
            state = (
                "itself"
                if linked_id == checkpoint.id
                else "missing"
                if linked is None
                else linked.status
            )
            what = "base" if role == LineageRole.base else "parent"
            raise InvalidInput(
                f"metadata of checkpoint '{checkpoint.name}': {what} checkpoint {linked_id} is {state}"
            )


def link_moe_experts(*, session: Session, checkpoint: Checkpoint) -> None:
    """Lineage edges from each expert and the compressed source (role ``input``) and the dense
    base (role ``base``)."""
    edges = [
        LineageCreate(parent_id=linked_id, child_id=checkpoint.id or 0, role=role)
        for linked_id, role in _linked_ids(checkpoint)
    ]
    if edges:
        add_lineage_edges(session=session, edges=edges)
