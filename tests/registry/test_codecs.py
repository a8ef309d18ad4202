"""The codec registry and the chunked zipnn / zipnn-delta codecs: any range of a compressed
blob reads back byte for byte, only the chunks a range touches are fetched, and a malformed or
incomplete blob is refused with a message naming it."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from registry.storage import ObjectStore, StorageError, open_store, zipnn_codec
from registry.storage.base import READ_CHUNK
from registry.storage.chunk_table import ChunkFormatError, Encoding
from registry.storage.codecs import (
    StoredBlob,
    get_codec,
    iter_original,
    known_codecs,
    read_original,
    register_codec,
)
from registry.storage.zipnn_codec import encode_chunk, load_table
from registry.storage.zipnn_encoder import TensorSpan, plan_segments, write_compressed

CHUNK = 64 * 1024


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": (torch.randn(256, 512, generator=gen) * 0.02).to(torch.bfloat16),
        "layers.0.norm": torch.ones(512, dtype=torch.bfloat16),
        "layers.0.proj": (torch.randn(128, 128, generator=gen) * 0.05).half(),
        "layers.0.bias": torch.randn(300, generator=gen),
        "steps": torch.arange(17, dtype=torch.int64),
        "tiny": torch.tensor([1.5], dtype=torch.bfloat16),
    }


def _finetune(base: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        mask = torch.rand(tensor.shape, generator=gen) < share
        noise = torch.randn(tensor.shape, generator=gen) * 0.01
        out[name] = (tensor.float() + noise * mask).to(tensor.dtype)
    return out


def _spans(data: bytes, base: bytes | None = None) -> list[TensorSpan]:
    def header(raw: bytes) -> tuple[int, dict]:
        (length,) = struct.unpack("<Q", raw[:8])
        return 8 + length, json.loads(raw[8 : 8 + length])

    start, entries = header(data)
    base_start, base_entries = header(base) if base is not None else (0, {})
    spans = []
    for name, entry in entries.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        other = base_entries.get(name)
        at = base_start + other["data_offsets"][0] if other else None
        spans.append(TensorSpan(start + begin, start + end, entry["dtype"], at))
    return spans


def _raw(store: ObjectStore, data: bytes) -> StoredBlob:
    info = store.put_bytes(data)
    return StoredBlob(info.key, info.size)


def _compress(
    store: ObjectStore, data: bytes, base: bytes | None = None
) -> tuple[StoredBlob, StoredBlob | None]:
    original = _raw(store, data)
    base_blob = _raw(store, base) if base is not None else None
    segments = plan_segments(len(data), _spans(data, base), chunk_bytes=CHUNK)
    result = write_compressed(store, original=original, segments=segments, base=base_blob)
    codec = "zipnn-delta" if result.uses_base else "zipnn"
    refs = {"base": base_blob} if result.uses_base and base_blob is not None else {}
    params = {"table": list(result.table)}
    return StoredBlob(result.info.key, len(data), codec, refs, params), base_blob


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    url = request.getfixturevalue("s3_store_url")
    endpoint = request.getfixturevalue("s3_endpoint")
    return open_store(
        url, endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def _check_ranges(store: ObjectStore, blob: StoredBlob, data: bytes) -> None:
    whole = b"".join(iter_original(store, blob))
    assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(data).hexdigest()
    size = len(data)
    cuts = [(0, 8), (0, 1), (5, CHUNK + 7), (CHUNK - 1, CHUNK + 1), (size - 3, size)]
    cuts += [(size // 3, 2 * size // 3), (size // 2, size // 2 + 1), (0, size)]
    for start, end in cuts:
        assert read_original(store, blob, start, end - start) == data[start:end], (start, end)
    small = list(iter_original(store, blob, start=10, end=10 + 3 * 1000 + 5, chunk_size=1000))
    assert all(0 < len(piece) <= 1000 for piece in small)
    assert b"".join(small) == data[10 : 10 + 3005]


def test_zipnn_round_trip_and_ranges(store: ObjectStore) -> None:
    data = save(_tensors(), metadata={"format": "pt"})
    blob, _ = _compress(store, data)
    assert blob.codec == "zipnn"
    stored = store.size(blob.key)
    assert stored < 0.85 * len(data), (stored, len(data))
    table = load_table(store, blob)
    used = {chunk.encoding for chunk in table.chunks}
    assert Encoding.ZIPNN in used and not table.uses_base
    _check_ranges(store, blob, data)


@pytest.mark.parametrize("share", [0.01, 1.0])
def test_delta_against_base_is_smaller_and_exact(store: ObjectStore, share: float) -> None:
    base = _tensors()
    base_bytes = save(base)
    tuned = save(_finetune(base, share), metadata={"task": "x"})
    alone, _ = _compress(store, tuned)
    delta, base_blob = _compress(store, tuned, base_bytes)
    assert delta.codec == "zipnn-delta" and base_blob is not None
    assert store.size(delta.key) < store.size(alone.key)
    if share < 0.05:
        assert store.size(delta.key) * 3 < len(tuned)
    assert delta.keys() == {delta.key, base_blob.key}
    _check_ranges(store, delta, tuned)


def test_delta_against_compressed_base(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    base = _tensors()
    base_bytes, tuned = save(base), save(_finetune(base, 0.02))
    compressed_base, _ = _compress(store, base_bytes)
    original = _raw(store, tuned)
    segments = plan_segments(len(tuned), _spans(tuned, base_bytes), chunk_bytes=CHUNK)
    result = write_compressed(store, original=original, segments=segments, base=compressed_base)
    blob = StoredBlob(result.info.key, len(tuned), "zipnn-delta", {"base": compressed_base})
    assert result.uses_base
    _check_ranges(store, blob, tuned)


class _CountingStore:
    """Wraps a store and records every range read (key, start, end)."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.url, self.reads = inner, inner.url, []  # same url: shared table cache

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self.reads.append((key, start, start + length))
        return self.inner.read_range(key, start, length)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def iter_bytes(self, key: str, **kwargs: int) -> Iterator[bytes]:
        raise AssertionError("a compressed read must not stream the whole object")


def test_range_read_fetches_only_overlapping_chunks(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    data = save(_tensors())
    blob, _ = _compress(store, data)
    counting = _CountingStore(store)
    table = load_table(store, blob)
    middle = table.chunks[len(table.chunks) // 2]
    got = read_original(counting, blob, middle.start + 1, 10)  # type: ignore[arg-type]
    assert got == data[middle.start + 1 : middle.start + 11]
    assert counting.reads == [(blob.key, middle.offset, middle.offset + middle.stored)]


def test_table_from_footer_when_params_are_missing(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    data = save(_tensors(3))
    blob, _ = _compress(store, data)
    bare = StoredBlob(blob.key, blob.size, "zipnn")
    assert read_original(store, bare, 100, 5000) == data[100:5100]


def test_refusals_name_the_blob(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    junk = _raw(store, b"x" * 100)
    with pytest.raises(ChunkFormatError, match=junk.key):
        read_original(store, StoredBlob(junk.key, 100, "zipnn"), 0, 10)
    base = _tensors()
    delta, _ = _compress(store, save(_finetune(base, 0.1)), save(base))
    orphan = StoredBlob(delta.key, delta.size, "zipnn-delta", {}, delta.params)
    with pytest.raises(StorageError, match="base"):
        read_original(store, orphan, 0, 10)
    with pytest.raises(ValueError, match=r"unknown codec 'nope'; known: .*raw.*zipnn"):
        read_original(store, StoredBlob(junk.key, 100, "nope"), 0, 1)
    with pytest.raises(ValueError, match="outside"):
        read_original(store, delta, delta.size - 1, 2)


def test_registry_accepts_new_codecs(tmp_path: Path) -> None:
    class Upper:
        name = "test-upper"

        def iter_original(
            self, store: ObjectStore, blob: StoredBlob, *, start: int, end: int, chunk_size: int
        ) -> Iterator[bytes]:
            yield store.read_range(blob.refs["src"].key, start, end - start).upper()

    register_codec(Upper())
    store = open_store(f"file://{tmp_path}")
    src = _raw(store, b"abcdef")
    blob = StoredBlob("unused", 6, "test-upper", {"src": src})
    assert read_original(store, blob, 1, 3) == b"BCD"
    assert "test-upper" in known_codecs() and get_codec("test-upper").name == "test-upper"
    with pytest.raises(ValueError, match="built in"):
        register_codec(type("Raw", (), {"name": "raw"})())  # type: ignore[arg-type]
    assert b"".join(iter_original(store, src, chunk_size=READ_CHUNK)) == b"abcdef"


def test_encode_chunk_picks_the_smallest_exact_encoding() -> None:
    zeros = bytes(8192)
    assert encode_chunk(zeros, "BF16")[0] == Encoding.ZIPNN
    assert encode_chunk(zeros, "")[0] == Encoding.ZSTD
    noise = (
        torch.randint(
            0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
        )
        .numpy()
        .tobytes()
    )
    assert encode_chunk(noise, "")[0] == Encoding.RAW
    weights = (torch.randn(8192) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    encoding, payload = encode_chunk(weights, "BF16")
    assert encoding == Encoding.ZIPNN and len(payload) < 0.8 * len(weights)
    changed = bytearray(weights)
    changed[100] ^= 1
    encoding, payload = encode_chunk(bytes(changed), "BF16", weights)
    assert encoding.is_delta and len(payload) < 200


def test_chunk_by_chunk_fetches_read_in_order(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request per chunk (on S3 the next one is fetched while one is consumed)."""
    monkeypatch.setattr(zipnn_codec, "FETCH_BYTES", 1)
    base = _tensors(4)
    tuned = save(_finetune(base, 0.3))
    blob, _ = _compress(store, tuned, save(base))
    assert len(load_table(store, blob).chunks) > 4
    _check_ranges(store, blob, tuned)
