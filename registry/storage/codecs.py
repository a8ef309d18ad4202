"""How a stored blob's bytes map back to the original file: every read of a checkpoint file's
content (downloads, HTTP Range, the merge engine's row reads) goes through this module, so a
blob kept compressed at rest is read exactly as if it were stored raw.

``StoredBlob`` describes one stored object; ``iter_original`` / ``read_original`` serve bytes
``[start, end)`` of the ORIGINAL file by dispatching on ``blob.codec`` to a registered ``Codec``.
Built in: ``raw`` (the object holds the file's own bytes; the fast path), ``zipnn`` and
``zipnn-delta`` (chunked lossless compression, ``registry.storage.zipnn_codec``). More codecs
(e.g. family compression, which rebuilds a file from several blobs in ``StoredBlob.refs``) plug
in with ``register_codec`` or, to defer heavy imports, ``register_lazy_codec``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from registry.storage.base import READ_CHUNK, ObjectStore, resolve_range

RAW = "raw"


@dataclass(frozen=True)
class StoredBlob:
    """One stored object: its key, the original file's size, its codec, the other blobs the
    codec decodes against (``refs``, e.g. ``{"base": ...}`` for a delta) and codec parameters."""

    key: str
    size: int
    codec: str = RAW
    refs: Mapping[str, StoredBlob] = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)

    def keys(self) -> set[str]:
        """Every store key this blob's bytes depend on (itself and its refs, recursively)."""
        found = {self.key}
        for ref in self.refs.values():
            found |= ref.keys()
        return found


class Codec(Protocol):
    """Decodes a stored object back to the original file's bytes, by range."""

    name: str

    def iter_original(
        self, store: ObjectStore, blob: StoredBlob, *, start: int, end: int, chunk_size: int
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the original file (``0 <= start < end <= blob.size``)."""
        ...


_REGISTERED: dict[str, Codec] = {}
# name -> "module:attribute" of a Codec, imported on first use (zipnn pulls in torch).
_LAZY: dict[str, str] = {
    "zipnn": "registry.storage.zipnn_codec:ZIPNN",
    "zipnn-delta": "registry.storage.zipnn_codec:ZIPNN_DELTA",
    "tall": "registry.storage.tall_codec:TALL",  # family compression (lossy, opt-in)
}
_LOCK = threading.Lock()


def register_codec(codec: Codec) -> None:
    """Make ``codec`` serve blobs whose ``codec`` is ``codec.name`` (replacing any before)."""
    if codec.name == RAW:
        raise ValueError("the 'raw' codec is built in and cannot be replaced")
    with _LOCK:
        _REGISTERED[codec.name] = codec
        _LAZY.pop(codec.name, None)


def register_lazy_codec(name: str, target: str) -> None:
    """Register codec ``name`` as ``"module:attribute"``, imported when first needed."""
    if name == RAW or ":" not in target:
        raise ValueError(f"cannot register codec {name!r} as {target!r}: use 'module:attribute'")
    with _LOCK:
        _LAZY[name] = target


def known_codecs() -> list[str]:
    """Every codec name that can be decoded, sorted."""
    return sorted({RAW, *_REGISTERED, *_LAZY})


def get_codec(name: str) -> Codec:
    """The registered codec ``name``; ``ValueError`` listing the known ones otherwise."""
    codec = _REGISTERED.get(name)
    if codec is not None:
        return codec
    target = _LAZY.get(name)
    if target is None:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(known_codecs())}")
    module, _, attribute = target.partition(":")
    loaded: Codec = getattr(importlib.import_module(module), attribute)
    with _LOCK:
        _REGISTERED[name] = loaded
    return loaded


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
    if start == end:
        return iter(())
    if blob.codec == RAW:
        return store.iter_bytes(blob.key, start=start, end=end, chunk_size=chunk_size)
    try:
        codec = get_codec(blob.codec)
    except ValueError as exc:
        raise ValueError(f"blob '{blob.key}': {exc}") from None
    return codec.iter_original(store, blob, start=start, end=end, chunk_size=chunk_size)


def read_original(store: ObjectStore, blob: StoredBlob, start: int, length: int) -> bytes:
    """Exactly ``length`` bytes of the original file from ``start``."""
    return b"".join(iter_original(store, blob, start=start, end=start + length))
