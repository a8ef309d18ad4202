"""Row reads of the store-backed tensor sources over a real S3 endpoint (moto_server over HTTP).

HTTP requests are counted with botocore's event hooks on the store's own client, so "one range
request per call" and "no header request" are checked on the wire, not in the source.
"""

from __future__ import annotations

import pickle
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from registry.safetensors_check import inspect_safetensors_header
from registry.services.validation import tensor_index
from registry.storage import ObjectStore, open_store
from registry.storage.codecs import StoredBlob
from registry.storage.range_source import (
    BlobTensorSource,
    ShardedBlobTensorSource,
    TensorIndexError,
)

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


class Wire:
    """S3 operations and GetObject body bytes seen on one boto3 client."""

    def __init__(self, client: Any) -> None:
        self.ops: Counter[str] = Counter()
        self.body_bytes = 0
        self._lock = threading.Lock()
        client.meta.events.register("before-call.s3", self._before)
        client.meta.events.register("after-call.s3.GetObject", self._after)

    def _before(self, model: Any, **_: Any) -> None:
        with self._lock:
            self.ops[model.name] += 1

    def _after(self, parsed: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.body_bytes += int(parsed.get("ContentLength", 0))

    def reset(self) -> None:
        self.ops.clear()
        self.body_bytes = 0


@pytest.fixture
def s3(s3_store_url: str, s3_endpoint: str) -> Iterator[tuple[ObjectStore, Wire]]:
    store = open_store(
        s3_store_url,
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    yield store, Wire(store.client)  # type: ignore[attr-defined]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def _stored(
    store: ObjectStore, tensors: dict[str, torch.Tensor]
) -> tuple[StoredBlob, dict[str, Any]]:
    """Upload a safetensors file; returns its blob and the index ``complete`` would store."""
    data = save(tensors)
    info = store.put_bytes(data)
    header = inspect_safetensors_header(
        lambda start, length: data[start : start + length], len(data), name="m.safetensors"
    )
    return StoredBlob(info.key, info.size), tensor_index(header)


def _rows_tensors() -> dict[str, torch.Tensor]:
    tensors = {
        f"m.{str(d).removeprefix('torch.')}": _tensor(d, (6, 3), i) for i, d in enumerate(DTYPES)
    }
    tensors["vec"] = _tensor(torch.float32, (7,))
    tensors["cube"] = _tensor(torch.bfloat16, (4, 2, 5))
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    return tensors


@pytest.mark.parametrize(
    ("start", "stop"), [(0, 1), (5, 6), (1, 4), (0, 6), (2, 2), (4, 100), (-3, 2), (5, 1)]
)
def test_rows_of_every_dtype_are_exact_and_fetch_only_their_span(
    s3: tuple[ObjectStore, Wire], start: int, stop: int
) -> None:
    store, wire = s3
    tensors = _rows_tensors()
    blob, index = _stored(store, tensors)
    wire.reset()
    source = BlobTensorSource(store, blob, "m", index=index, read_ahead_bytes=0)
    assert sum(wire.ops.values()) == 0  # the stored index replaces the header: no request
    for name, tensor in tensors.items():
        if tensor.dim() == 0:
            continue
        before, fetched, ops = source.stats.bytes, wire.body_bytes, wire.ops["GetObject"]
        got = source.get_rows(name, start, stop)
        want = tensor[max(start, 0) : stop]
        assert got.dtype == tensor.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
        span = want.numel() * want.element_size()
        assert source.stats.bytes - before == span, name
        assert wire.body_bytes - fetched == span, name  # exactly the rows' bytes on the wire
        assert wire.ops["GetObject"] - ops == (1 if span else 0), name
    assert set(wire.ops) <= {"GetObject"}


def test_whole_tensors_scalars_and_the_header_fallback(s3: tuple[ObjectStore, Wire]) -> None:
    store, wire = s3
    tensors = _rows_tensors()
    blob, index = _stored(store, tensors)
    wire.reset()
    fallback = BlobTensorSource(store, blob, "m")  # no index: the header is read
    assert wire.ops == Counter({"GetObject": 2})  # length, then the JSON header
    indexed = BlobTensorSource(store, blob, "m", index=index)
    assert fallback.index() == indexed.index() == index
    for name, tensor in tensors.items():
        assert torch.equal(indexed.get(name), tensor), name
        assert indexed.metadata(name) == (tensor.dtype, tuple(tensor.shape))
    with pytest.raises(ValueError, match="'scalar' of source 'm' is a scalar"):
        indexed.get_rows("scalar", 0, 1)
    with pytest.raises(KeyError, match="'nope' not found in source 'm'"):
        indexed.get_rows("nope", 0, 1)


def _entry(**change: Any) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [2, 3], "start": 8, "end": 32} | change


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (_entry(dtype="F8"), "unsupported dtype 'F8'"),
        (_entry(shape=[2, -3]), r"invalid shape \[2, -3\]"),
        (_entry(shape=[True, 3]), "invalid shape"),
        (_entry(shape="2x3"), "invalid shape"),
        (_entry(start=None), "invalid start/end None/32"),
        (_entry(end=36), r"\[8, 36\) does not fit shape \(2, 3\) \(24 bytes\)"),
        (_entry(start=0, end=24), r"\[0, 24\) does not fit"),
        (_entry(start=100, end=124), r"inside bytes \[8, 64\)"),
        ("F32", "entry for tensor 'w' is not an object"),
    ],
)
def test_bad_index_entries_are_refused(entry: Any, match: str) -> None:
    blob = StoredBlob("blobs/sha256/" + "0" * 64, 64)
    with pytest.raises(TensorIndexError, match=match) as info:
        BlobTensorSource(None, blob, "m", index={"w": entry})  # type: ignore[arg-type]
    assert "'w'" in str(info.value) and blob.key in str(info.value)


def test_sharded_rows_share_one_fetch_count_and_check_the_map(
    s3: tuple[ObjectStore, Wire],
) -> None:
    store, wire = s3
    tensors = _rows_tensors()
    names = sorted(n for n, t in tensors.items() if t.dim())
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    blob_a, index_a = _stored(store, {n: tensors[n] for n in first})
    blob_b, index_b = _stored(store, {n: tensors[n] for n in second})
    weight_map = {n: blob_a for n in first} | {n: blob_b for n in second}
    indexes = {blob_a.key: index_a, blob_b.key: index_b}
    wire.reset()
    source = ShardedBlobTensorSource(
        store, weight_map, "sharded", indexes=indexes, read_ahead_bytes=0
    )
    total = 0
    for name in names:
        want = tensors[name][1:3]
        assert torch.equal(source.get_rows(name, 1, 3), want), name
        total += want.numel() * want.element_size()
    assert source.stats.bytes == wire.body_bytes == total
    assert wire.ops == Counter({"GetObject": source.stats.requests})
    with pytest.raises(TensorIndexError, match="does not list it"):
        ShardedBlobTensorSource(store, {first[0]: blob_b}, "x", indexes=indexes)


def test_concurrent_row_reads_from_threads(s3: tuple[ObjectStore, Wire]) -> None:
    store, wire = s3
    big = _tensor(torch.bfloat16, (64, 256))
    blob, index = _stored(store, {"w": big, "v": big[:8].clone()})
    source = BlobTensorSource(store, blob, "m", index=index, read_ahead_bytes=0)
    slices = [(start, start + 4) for start in range(0, 64, 4)] * 3
    wire.reset()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda span: source.get_rows("w", *span), slices))
    for (start, stop), got in zip(slices, results, strict=True):
        assert torch.equal(got, big[start:stop])
    assert source.stats.requests == wire.ops["GetObject"] == len(slices)
    assert source.stats.bytes == wire.body_bytes == 3 * big.numel() * 2


def test_a_file_store_reads_the_same_rows(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    tensors = _rows_tensors()
    blob, index = _stored(store, tensors)
    source = BlobTensorSource(store, blob, "m", index=index)
    for name, tensor in tensors.items():
        if tensor.dim():
            assert torch.equal(source.get_rows(name, 2, 5), tensor[2:5]), name


def test_sources_pickle_as_where_to_read(
    s3: tuple[ObjectStore, Wire], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dask workers get sources by pickle: they reopen the store (one client per process)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    store, _ = s3
    tensors = _rows_tensors()
    blob, index = _stored(store, tensors)
    single = BlobTensorSource(store, blob, "m", index=index)
    sharded = ShardedBlobTensorSource(
        store, dict.fromkeys(index, blob), "s", indexes={blob.key: index}
    )
    for source in (single, sharded):
        copy = pickle.loads(pickle.dumps(source))
        assert copy.name == source.name and copy.keys() == source.keys()
        assert copy.store is not store and copy.store.url == store.url
        assert torch.equal(copy.get_rows("m.bfloat16", 1, 4), tensors["m.bfloat16"][1:4])
    assert pickle.loads(pickle.dumps(single)).store is copy.store  # one store per spec


def test_slices_come_from_read_ahead_windows(s3: tuple[ObjectStore, Wire]) -> None:
    """Equal slices in order: one request per window of 4 slices, every byte fetched once."""
    store, wire = s3
    big = _tensor(torch.bfloat16, (64, 256))  # 512 bytes a row
    blob, index = _stored(store, {"w": big})
    source = BlobTensorSource(store, blob, "m", index=index, read_ahead_bytes=8 * 1024)
    wire.reset()
    for start in range(0, 64, 4):
        assert torch.equal(source.get_rows("w", start, start + 4), big[start : start + 4])
    assert wire.ops["GetObject"] == source.stats.requests == 4
    assert wire.body_bytes == source.stats.bytes == big.numel() * 2


def test_read_ahead_windows_are_shared_between_threads(s3: tuple[ObjectStore, Wire]) -> None:
    store, wire = s3
    big = _tensor(torch.bfloat16, (64, 256))
    blob, index = _stored(store, {"w": big})
    source = BlobTensorSource(store, blob, "m", index=index, read_ahead_bytes=8 * 1024)
    slices = [(start, start + 4) for start in range(0, 64, 4)]
    wire.reset()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda span: source.get_rows("w", *span), slices))
    for (start, stop), got in zip(slices, results, strict=True):
        assert torch.equal(got, big[start:stop])
    assert wire.body_bytes == big.numel() * 2  # no byte twice, whatever the thread order
    assert wire.ops["GetObject"] <= 8


def test_large_reads_bypass_the_windows_and_straddling_reads_fetch_only_the_rest(
    s3: tuple[ObjectStore, Wire],
) -> None:
    store, wire = s3
    big = _tensor(torch.bfloat16, (64, 256))
    blob, index = _stored(store, {"w": big})
    source = BlobTensorSource(store, blob, "m", index=index, read_ahead_bytes=8 * 1024)
    wire.reset()
    assert torch.equal(source.get_rows("w", 0, 32), big[:32])  # 16 KiB > one window
    assert wire.body_bytes == 32 * 512
    assert torch.equal(source.get_rows("w", 32, 36), big[32:36])  # opens a window 32:48
    assert torch.equal(source.get_rows("w", 30, 34), big[30:34])  # rows 30:32, then the window
    assert wire.ops["GetObject"] == 3
    assert wire.body_bytes == 32 * 512 + 16 * 512 + 2 * 512  # no byte twice


def test_windows_span_neighbouring_tensors(s3: tuple[ObjectStore, Wire]) -> None:
    """Small tensors next to each other in the file come with one window, which stops where a
    large tensor already read begins; a whole small tensor read (``get``) takes what open
    windows hold and opens none itself."""
    store, wire = s3
    tensors = {f"t{i}": _tensor(torch.bfloat16, (8, 64), seed=i) for i in range(6)}  # 1 KiB each
    tensors["z"] = _tensor(torch.bfloat16, (64, 256), seed=9)  # 32 KiB, after them in the file
    blob, index = _stored(store, tensors)
    source = BlobTensorSource(store, blob, "m", index=index, read_ahead_bytes=8 * 1024)
    wire.reset()
    assert torch.equal(source.get("z"), tensors["z"])  # larger than a window: its bytes only
    assert torch.equal(source.get("t5"), tensors["t5"])  # no window open: its bytes only
    assert (wire.ops["GetObject"], wire.body_bytes) == (2, 32 * 1024 + 1024)
    for name in ("t0", "t1", "t2", "t3", "t4"):
        assert torch.equal(source.get_rows(name, 0, 4), tensors[name][:4])
        assert torch.equal(source.get_rows(name, 4, 8), tensors[name][4:])
    assert wire.ops["GetObject"] == 3  # t0..t4 from one window, with t5 again but not z
    assert wire.body_bytes == 32 * 1024 + 1024 + 6 * 1024
    assert torch.equal(source.get("t4"), tensors["t4"])  # its window is closed: fetched again
    assert wire.ops["GetObject"] == 4
