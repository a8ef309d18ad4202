"""How a stored blob's bytes map back to the original file: every read of a checkpoint file's
content (downloads, HTTP Range, the merge engine's row reads) goes through this module, so a
blob kept compressed at rest is read exactly as if it were stored raw.

``StoredBlob`` describes one stored object; ``iter_original`` / ``read_original`` serve bytes
``[start, end)`` of the ORIGINAL file. Codecs: ``raw`` (the object holds the file's own bytes).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from registry.storage.base import READ_CHUNK, ObjectStore, resolve_range


@dataclass(frozen=True)
class StoredBlob:
    """One stored object: its key, the original file's size, its codec, the other blobs the
    codec decodes against (``refs``, e.g. ``{"base": ...}`` for a delta) and codec parameters."""

    key: str
    size: int
    codec: str = "raw"
    refs: Mapping[str, StoredBlob] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def keys(self) -> set[str]:
        """Every store key this blob's bytes depend on (itself and its refs, recursively)."""
        found = {self.key}
        for ref in self.refs.values():
            found |= ref.keys()
        return found


def iter_original(
    store: ObjectStore,
    blob: StoredBlob,
    *,
    start: int = 0,
    end: int | None = None,
    chunk_size: int = READ_CHUNK,
) -> Iterator[bytes]:
    """Stream bytes ``[start, end)`` of the original file (``end=None``: to its end)."""
    start, end = resolve_range(blob.key, start, end, blob.size)
    if blob.codec == "raw":
        if start == end:
            return iter(())
        return store.iter_bytes(blob.key, start=start, end=end, chunk_size=chunk_size)
    raise ValueError(f"blob '{blob.key}' has unknown codec {blob.codec!r}; known: raw")


def read_original(store: ObjectStore, blob: StoredBlob, start: int, length: int) -> bytes:
    """Exactly ``length`` bytes of the original file from ``start``."""
    return b"".join(iter_original(store, blob, start=start, end=start + length))
