"""Storing a family in TALL form: the multi-task vector, one mask per member, ``tall`` file rows.

``store_family`` writes ``τ_MTL`` as a ``task_vector`` artifact of the base and each member's
bit-packed mask as a ``mask`` artifact, then points file rows at the ``tall`` codec: either the
members' own rows (``replace``: their original blobs are released to garbage collection) or
the rows of a new ``<name>.tall`` sibling checkpoint per member (keep both). Every row change is
one transaction; blobs stored before a failure are released.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save
from sqlmodel import Session, select

from mergeops.ops.masks import pack_masks
from registry.models import (
    Artifact,
    ArtifactRole,
    Checkpoint,
    CheckpointStatus,
    CheckpointTag,
    Lineage,
    LineageRole,
    utcnow,
)
from registry.services.blobs import stored_blob
from registry.services.common import checkpoint_files, load_checkpoint, release_blobs
from registry.services.family import Family, FamilyMember, weight_files
from registry.storage import ObjectStore
from registry.storage.codecs import StoredBlob
from registry.storage.tall_codec import (
    CODEC,
    ORIGINAL_SHA_KEY,
    RECONSTRUCTED_KEY,
    iter_tall,
    layout,
)

SIBLING_TAG = "tall-reconstructed"


@dataclass(frozen=True)
class MemberForm:
    """What the flow decided for one member: its λ, masks (bool) and dtypes."""

    member: FamilyMember
    lam: float
    masks: Mapping[str, torch.Tensor]
    retention: float | None = None


@dataclass
class StoredFamily:
    """Where the family form went and what it costs."""

    merged_bytes: int = 0
    mask_bytes: dict[int, int] = field(default_factory=dict)  # served checkpoint id -> bytes
    served: dict[int, int] = field(default_factory=dict)  # member id -> checkpoint serving it
    released: list[str] = field(default_factory=list)


def _index(data: bytes) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header.pop("__metadata__", None)
    return {
        name: {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "start": 8 + length + entry["data_offsets"][0],
            "end": 8 + length + entry["data_offsets"][1],
        }
        for name, entry in header.items()
    }


def _put_artifact(
    session: Session,
    store: ObjectStore,
    *,
    checkpoint_id: int,
    role: ArtifactRole,
    name: str,
    data: bytes,
    meta: dict[str, Any],
    stored: list[str],
) -> Artifact:
    info = store.put_stream([data])
    stored.append(info.key)
    query = select(Artifact).where(
        Artifact.checkpoint_id == checkpoint_id, Artifact.role == role, Artifact.name == name
    )
    row = session.exec(query).first() or Artifact(
        checkpoint_id=checkpoint_id, role=role, name=name, blob_key="", sha256="", size=0
    )
    row.blob_key, row.sha256, row.size, row.stored_size = (
        info.key,
        info.sha256,
        info.size,
        info.size,
    )
    row.tensor_index, row.meta = _index(data), meta
    session.add(row)
    session.flush()
    return row


def _sibling(session: Session, member: Checkpoint) -> Checkpoint:
    """A ready ``<name>.tall`` checkpoint serving the rebuilt member next to the original."""
    sibling = Checkpoint(
        name=f"{member.name}.tall"[:255],
        kind=member.kind,
        base_id=member.base_id,
        task=member.task,
        run=member.run,
        step=member.step,
        tags=[*member.tags, SIBLING_TAG],
        meta={"reconstructed_from": member.id},
        status=CheckpointStatus.ready,
        ready_at=utcnow(),
    )
    session.add(sibling)
    session.flush()
    for tag in sibling.tags:
        session.add(CheckpointTag(checkpoint_id=sibling.id or 0, tag=tag))
    for row in checkpoint_files(session, member.id or 0):
        if row.role == ArtifactRole.config:
            copy = row.model_dump(exclude={"id", "checkpoint_id", "created_at"})
            session.add(Artifact(checkpoint_id=sibling.id or 0, **copy))
    session.add(Lineage(parent_id=member.id or 0, child_id=sibling.id or 0, role=LineageRole.input))
    session.flush()
    return sibling


def _tall_params(original: Artifact, lam: float) -> dict[str, Any]:
    """Codec params of the rebuilt file: its tensors in the original's order, its metadata (the
    original's string metadata plus the reconstructed marks), λ and the member's dtype."""
    entries = sorted(original.tensor_index.items(), key=lambda item: item[1]["start"])
    tensors = [[name, e["dtype"], list(e["shape"])] for name, e in entries]
    file_meta = {k: v for k, v in (original.meta or {}).items() if isinstance(v, str)}
    file_meta.update({RECONSTRUCTED_KEY: CODEC, ORIGINAL_SHA_KEY: original.sha256})
    dtype = tensors[0][1] if tensors else "F32"
    return {"lambda": lam, "dtype": dtype, "tensors": tensors, "metadata": file_meta}


def _rebuilt_sha256(store: ObjectStore, blob: StoredBlob) -> str:
    digest = hashlib.sha256()
    for chunk in iter_tall(store, blob):
        digest.update(chunk)
    return digest.hexdigest()


def _tall_row(
    session: Session, store: ObjectStore, *, original: Artifact, target: Checkpoint,
    refs: Mapping[str, Artifact], lam: float,
) -> Artifact:  # fmt: skip
    """Point a file row of ``target`` at the ``tall`` codec (``refs``: the base, merged and mask
    rows); the row's sha256 and size become the rebuilt file's."""
    params = _tall_params(original, lam)
    found = layout(params["tensors"], params["metadata"])
    mask, merged = refs["mask"], refs["merged"]
    blobs = {
        "base": stored_blob(session, refs["base"]),
        "merged": StoredBlob(merged.blob_key, merged.size),
        "mask": StoredBlob(mask.blob_key, mask.size),
    }
    sha256 = _rebuilt_sha256(store, StoredBlob(mask.blob_key, found.size, CODEC, blobs, params))
    row = original
    if target.id != original.checkpoint_id:
        row = Artifact(
            checkpoint_id=target.id or 0, role=original.role, name=original.name, blob_key="",
            sha256="", size=0,
        )  # fmt: skip
    row.meta = {
        **(original.meta or {}),
        "codec_refs": {name: ref.sha256 for name, ref in refs.items()},
        "codec_params": params,
        "original_sha256": original.sha256,
        "original_size": original.size,
        "reconstructed": True,
    }
    row.codec, row.codec_base_sha256 = CODEC, refs["base"].sha256
    row.blob_key, row.stored_size = mask.blob_key, mask.size
    row.sha256, row.size, row.tensor_index = sha256, found.size, found.tensor_index()
    session.add(row)
    session.flush()
    return row


def _store_merged(
    session: Session, store: ObjectStore, family: Family, merged: Mapping[str, torch.Tensor],
    stored: list[str],
) -> dict[str, Artifact]:  # fmt: skip
    rows = {}
    members = [m.checkpoint_id for m in family.members]
    for file_name, tensors in family.files.items():
        part = {k: merged[k].contiguous() for k in tensors if k in merged}
        meta = {"format": "ckreg.tall-merged/v1", "members": json.dumps(members)}
        data = save(part, metadata=meta)
        digest = hashlib.sha256(data).hexdigest()[:12]
        rows[file_name] = _put_artifact(
            session, store, checkpoint_id=family.base_id, role=ArtifactRole.task_vector,
            name=f"tall-{digest}.{file_name}", data=data, meta={**meta, "family": members},
            stored=stored,
        )  # fmt: skip
    return rows


def _store_member(
    session: Session, store: ObjectStore, family: Family, form: MemberForm, *,
    merged_rows: Mapping[str, Artifact], base_rows: Mapping[str, Artifact], replace: bool,
    stored: list[str], result: StoredFamily,
) -> list[str]:  # fmt: skip
    """Store one member's masks and point its (or its sibling's) file rows at ``tall``."""
    member = load_checkpoint(session, form.member.checkpoint_id)
    target = member if replace else _sibling(session, member)
    old_keys, total, mask_total = [], 0, 0
    for original in weight_files(session, form.member.checkpoint_id):
        part = {k: form.masks[k] for k in family.files[original.name] if k in form.masks}
        tensors, meta = pack_masks(part)
        meta["lambda"] = str(form.lam)
        mask_row = _put_artifact(
            session, store, checkpoint_id=target.id or 0, role=ArtifactRole.mask,
            name=f"tall-mask.{original.name}", data=save(tensors, metadata=meta), meta=meta,
            stored=stored,
        )  # fmt: skip
        old_key = original.blob_key
        refs = {"base": base_rows[original.name], "merged": merged_rows[original.name]}
        row = _tall_row(
            session, store, original=original, target=target, refs={**refs, "mask": mask_row},
            lam=form.lam,
        )  # fmt: skip
        if replace:
            old_keys.append(old_key)
        total, mask_total = total + row.size, mask_total + mask_row.size
    target.total_bytes = sum(r.size for r in checkpoint_files(session, target.id or 0))
    target.meta = {
        **(target.meta or {}),
        "family_compression": {
            "codec": CODEC, "reconstructed": True, "base_id": family.base_id,
            "family": [m.checkpoint_id for m in family.members], "lambda": form.lam,
            "retention": form.retention, "mask_bytes": mask_total,
        },
    }  # fmt: skip
    session.add(target)
    result.mask_bytes[target.id or 0] = mask_total
    result.served[form.member.checkpoint_id] = target.id or 0
    return old_keys


def store_family(
    *,
    session: Session,
    store: ObjectStore,
    family: Family,
    merged: Mapping[str, torch.Tensor],
    forms: Sequence[MemberForm],
    replace: bool,
) -> StoredFamily:
    """Store the family form; ``replace`` swaps the members' own rows, else adds siblings."""
    stored: list[str] = []
    result = StoredFamily()
    base_rows = {row.name: row for row in weight_files(session, family.base_id)}
    try:
        merged_rows = _store_merged(session, store, family, merged, stored)
        result.merged_bytes = sum(row.size for row in merged_rows.values())
        old_keys: list[str] = []
        for form in forms:
            old_keys += _store_member(
                session, store, family, form, merged_rows=merged_rows, base_rows=base_rows,
                replace=replace, stored=stored, result=result,
            )  # fmt: skip
        session.commit()
    except BaseException:
        session.rollback()
        release_blobs(session=session, store=store, keys=stored)
        raise
    result.released = release_blobs(session=session, store=store, keys=old_keys)
    return result
