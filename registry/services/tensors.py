"""Tensor-level access to stored checkpoints: mergeops ``TensorSource``s and a streaming writer."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch
from sqlmodel import Session

from mergeops.sources import TensorSource
from registry.errors import InvalidInput, NotFound
from registry.models import Artifact, ArtifactRole, CheckpointStatus
from registry.safetensors_check import INDEX_FILE_NAME
from registry.services.artifacts import find_artifact
from registry.services.blobs import stored_blob
from registry.services.common import checkpoint_files, load_checkpoint
from registry.storage import ObjectStore
from registry.storage.codecs import read_original
from registry.storage.range_source import BlobTensorSource, ShardedBlobTensorSource

MAX_INDEX_BYTES = 64 * 1024 * 1024

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def checkpoint_tensor_source(
    *,
    session: Session,
    store: ObjectStore,
    checkpoint_id: int,
    role: ArtifactRole | str = ArtifactRole.weights,
) -> TensorSource:
    """A range-reading ``TensorSource`` (with row reads) over a checkpoint's weights or one of
    its artifacts; tensors are located by the index stored at ``complete`` (no header reads)."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status == CheckpointStatus.deleted:
        raise NotFound(f"checkpoint {checkpoint_id} '{checkpoint.name}' is deleted")
    role = ArtifactRole(role)
    if role == ArtifactRole.config:
        raise InvalidInput("config files hold no tensors")
    if role != ArtifactRole.weights:
        artifact = find_artifact(session=session, checkpoint_id=checkpoint_id, role=role)
        if artifact is None:
            raise NotFound(f"checkpoint {checkpoint_id} '{checkpoint.name}' has no {role} artifact")
        return file_tensor_source(
            session=session, store=store, artifact=artifact, name=checkpoint.name
        )
    weights = [
        a for a in checkpoint_files(session, checkpoint_id) if a.role == ArtifactRole.weights
    ]
    if not weights:
        raise NotFound(f"checkpoint {checkpoint_id} '{checkpoint.name}' has no weights")
    if len(weights) == 1:
        return file_tensor_source(
            session=session, store=store, artifact=weights[0], name=checkpoint.name
        )
    blobs = {a.blob_key: stored_blob(session, a) for a in weights}
    # Tensors in the order a local read of the checkpoint folder gives (the index file's
    # weight_map, else file by file), so a streamed merge writes byte-identical output.
    shard_of = {tensor: a.blob_key for a in weights for tensor in sorted(a.tensor_index)}
    order = [t for t in _index_order(session, store, checkpoint_id) if t in shard_of]
    order += [t for t in shard_of if t not in set(order)]
    weight_map = {tensor: blobs[shard_of[tensor]] for tensor in order}
    indexes = {a.blob_key: a.tensor_index for a in weights if a.tensor_index}
    return ShardedBlobTensorSource(store, weight_map, checkpoint.name, indexes=indexes)


def _index_order(session: Session, store: ObjectStore, checkpoint_id: int) -> list[str]:
    """Tensor names in the order of the checkpoint's ``model.safetensors.index.json`` (one
    small read; validated at ``complete``), or [] when it has none."""
    files = checkpoint_files(session, checkpoint_id)
    index = next((f for f in files if f.name == INDEX_FILE_NAME), None)
    if index is None or index.size > MAX_INDEX_BYTES:
        return []
    raw = read_original(store, stored_blob(session, index), 0, index.size)
    try:
        weight_map = json.loads(raw).get("weight_map")
    except (ValueError, AttributeError):
        return []
    return [str(name) for name in weight_map] if isinstance(weight_map, dict) else []


def file_tensor_source(
    *, session: Session, store: ObjectStore, artifact: Artifact, name: str
) -> BlobTensorSource:
    """A range-reading source over one stored file, by its stored tensor index when it has one."""
    return BlobTensorSource(
        store, stored_blob(session, artifact), name, index=artifact.tensor_index or None
    )


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


class SafetensorsStreamWriter:
    """Writes a safetensors file tensor by tensor; the layout (names, dtypes, shapes) is fixed
    up front so the header can be written first and only one tensor is in memory at a time."""

    def __init__(
        self, handle: BinaryIO, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]
    ) -> None:
        self._handle = handle
        self._expected = [name for name, _, _ in layout]
        self._shapes = {name: (dtype, shape) for name, dtype, shape in layout}
        header: dict[str, object] = {}
        offset = 0
        for name, dtype, shape in layout:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        handle.write(struct.pack("<Q", len(raw)) + raw)
        self._written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; names must come in layout order with the declared dtype/shape."""
        if self._written >= len(self._expected) or self._expected[self._written] != name:
            raise ValueError(
                f"tensor '{name}' written out of order; expected {self._expected[self._written :][:1]}"
            )
        dtype, shape = self._shapes[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor '{name}' is {tensor.dtype} {tuple(tensor.shape)}, declared {dtype} {shape}"
            )
        self._handle.write(_tensor_bytes(tensor))
        self._written += 1

    def close(self) -> None:
        if self._written != len(self._expected):
            raise ValueError(f"only {self._written} of {len(self._expected)} tensors were written")


@contextmanager
def safetensors_stream_writer(
    path: Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]
) -> Iterator[SafetensorsStreamWriter]:
    """A ``SafetensorsStreamWriter`` on ``path``; a failed write removes the partial file."""
    try:
        with path.open("wb") as handle:
            writer = SafetensorsStreamWriter(handle, layout)
            yield writer
            writer.close()
    except BaseException:
        path.unlink(missing_ok=True)
        raise
