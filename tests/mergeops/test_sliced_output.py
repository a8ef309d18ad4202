"""Row-chunked tensors go straight into their shard slice by slice: the same bytes as the whole
tensor path whatever the shard size, never a whole output tensor, reused buffers, background
writes whose failures surface and leave nothing behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mergeops
from mergeops import chunking
from mergeops.io.background import BackgroundWrites
from mergeops.io.readers import SafetensorsFile, SourceError
from mergeops.io.streamed import StreamedShards
from mergeops.io.writer import OutputError, ShardedWriter
from mergeops.methods.base import MergeError
from mergeops.slice_io import BufferPool
from tests.mergeops.test_prefetch import family, write_family

SLICE = 8 * 128 * 4  # 8 rows of embed (96, 128) per slice: 12 slices


def _merge(paths: list[Path], out: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    mergeops.merge_files("task_arithmetic", paths[1:], base=paths[0], out_dir=out,
                         device="cpu", progress=False, **kwargs)  # fmt: skip
    merged: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        merged.update(load_file(shard))
    return merged


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shard_size_and_slicing_leave_the_tensors_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    paths = write_family(tmp_path / "in", family())
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 1 << 40)
    whole = _merge(paths, tmp_path / "whole", dtype=dtype)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", SLICE)
    big = _merge(paths, tmp_path / "big", dtype=dtype, max_shard_size="5GB")
    small = _merge(paths, tmp_path / "small", dtype=dtype, max_shard_size="1MB")
    tiny = _merge(paths, tmp_path / "tiny", dtype=dtype, max_shard_size=30_000)
    assert len(list((tmp_path / "tiny").glob("*.safetensors"))) > 1
    for got in (big, small, tiny):
        assert got.keys() == whole.keys()
        for key in whole:
            assert torch.equal(whole[key].view(torch.uint8), got[key].view(torch.uint8)), key


def test_chunked_tensors_are_written_in_slices_never_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_family(tmp_path / "in", family())
    monkeypatch.setattr(chunking, "CHUNK_BYTES", SLICE)
    slices: list[tuple[str, int, int]] = []
    whole: list[str] = []
    add, write_rows = ShardedWriter.add, ShardedWriter.write_rows

    def record_add(self: ShardedWriter, name: str, tensor: torch.Tensor) -> None:
        whole.append(name)
        add(self, name, tensor)

    def record_rows(self: ShardedWriter, name: str, offset: int, data: torch.Tensor,
                    release: Any = None) -> None:  # fmt: skip
        slices.append((name, offset, data.numel()))
        write_rows(self, name, offset, data, release)

    monkeypatch.setattr(ShardedWriter, "add", record_add)
    monkeypatch.setattr(ShardedWriter, "write_rows", record_rows)
    merged = _merge(paths, tmp_path / "out")
    assert "embed" not in whole and "mlp" not in whole  # chunked: never handed over whole
    assert sorted(whole) == ["ids", "norm"]
    embed = [(offset, size) for name, offset, size in slices if name == "embed"]
    row_bytes = 128 * 2  # written in the output dtype, bfloat16 as stored
    assert len(embed) == 12 and all(size == 8 * row_bytes for _, size in embed)
    assert [offset for offset, _ in embed] == [i * 8 * row_bytes for i in range(12)]
    assert merged["embed"].shape == (96, 128)


def test_slice_buffers_are_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = write_family(tmp_path / "in", family())
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 2 * 128 * 4)  # 48 slices of embed, 4 inputs
    pools: list[BufferPool] = []
    init = BufferPool.__init__

    def remember(self: BufferPool) -> None:
        init(self)
        pools.append(self)

    monkeypatch.setattr(BufferPool, "__init__", remember)
    takes = [0]
    take = BufferPool.take

    def counted(self: BufferPool, nbytes: int) -> torch.Tensor:
        takes[0] += 1
        return take(self, nbytes)

    monkeypatch.setattr(BufferPool, "take", counted)
    _merge(paths, tmp_path / "out", prefetch_bytes=16 * 1024)
    assert takes[0] >= 5 * 48  # 4 raw reads and one output slice per slice of embed
    allocated = sum(pool.allocated for pool in pools)
    # bounded by what is in flight (8 slices read ahead, queued writes), not by slices
    assert 0 < allocated <= 60 < takes[0] // 4, (allocated, takes)


def test_a_failed_background_write_fails_the_merge_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_family(tmp_path / "in", family())
    monkeypatch.setattr(chunking, "CHUNK_BYTES", SLICE)
    calls = [0]
    original = StreamedShards.write_rows

    def failing(self: StreamedShards, name: str, offset: int, data: torch.Tensor) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        original(self, name, offset, data)

    monkeypatch.setattr(StreamedShards, "write_rows", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        _merge(paths, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))
    assert not [t for t in threading.enumerate() if t.name == "mergeops-write"]  # joined


def test_a_failed_merge_joins_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = family()
    tensors[2]["mlp"].view(-1)[-1] = float("nan")  # after embed's slices were queued
    paths = write_family(tmp_path / "in", tensors)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", SLICE)
    with pytest.raises(MergeError, match="tensor 'mlp' of model 'ft-2' contains NaN or Inf"):
        _merge(paths, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [t for t in threading.enumerate() if t.name == "mergeops-write"]


def test_a_non_finite_slice_names_the_whole_tensors_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = [{k: v.float() * 3e4 for k, v in m.items() if k != "ids"} for m in family()]
    paths = write_family(tmp_path / "in", tensors)
    messages = []
    for chunk in (1 << 40, SLICE):
        monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
        with pytest.raises(MergeError) as info:
            _merge(paths, tmp_path / "out", dtype="float16", params={"lambda": 3.0})
        messages.append(str(info.value))
        assert not (tmp_path / "out").exists()
    assert "merged tensor 'embed'" in messages[0]
    assert messages[0] == messages[1]  # same count "out of" the whole tensor's elements


def test_background_writes_bound_the_queue_and_report_failures() -> None:
    writes = BackgroundWrites(max_bytes=100)
    queued: list[int] = []
    released: list[int] = []
    gate = threading.Event()

    def job(i: int) -> Any:
        def run() -> None:
            gate.wait(5)
            queued.append(i)

        return run

    def submit_all() -> None:
        for i in range(5):
            writes.submit(job(i), 60, lambda i=i: released.append(i))

    producer = threading.Thread(target=submit_all)
    producer.start()
    time.sleep(0.2)
    assert producer.is_alive()  # 60 + 60 bytes exceed the bound: the producer waits
    gate.set()
    producer.join(5)
    writes.drain()
    assert queued == [0, 1, 2, 3, 4] and sorted(released) == [0, 1, 2, 3, 4]

    def boom() -> None:
        raise OSError("disk gone")

    writes.submit(boom, 1)
    with pytest.raises(OSError, match="disk gone"):
        writes.drain()
    late: list[int] = []
    with pytest.raises(OSError, match="disk gone"):
        writes.submit(lambda: late.append(1), 1, lambda: late.append(2))
    assert late == [2]  # refused, but its buffer is given back
    writes.stop()


def test_write_rows_refuses_slices_outside_the_declared_tensor(tmp_path: Path) -> None:
    from mergeops.io.streamed import TensorSpec

    layout = [TensorSpec("w", (4, 4), torch.float32)]
    writer = ShardedWriter(tmp_path, layout=layout, background=True)
    released: list[int] = []
    with pytest.raises(OutputError, match="outside"):
        writer.write_rows("w", 40, torch.zeros(32, dtype=torch.uint8), lambda: released.append(1))
    assert released == [1]
    with pytest.raises(OutputError, match="not in the declared layout"):
        writer.write_rows("v", 0, torch.zeros(4, dtype=torch.uint8))
    writer.write_rows("w", 0, torch.zeros(32, dtype=torch.uint8))
    with pytest.raises(OutputError, match="got 32 of its 64 bytes"):
        writer.rows_done("w")
    writer.write_rows("w", 32, torch.ones(32, dtype=torch.uint8))
    writer.rows_done("w")
    with pytest.raises(OutputError, match="written twice"):
        writer.add("w", torch.zeros(4, 4))
    writer.close()
    got = load_file(tmp_path / "model-00001-of-00001.safetensors")["w"]
    assert torch.equal(got.view(torch.uint8).reshape(-1)[32:], torch.ones(32, dtype=torch.uint8))


def test_get_rows_into_reads_into_the_given_buffer(tmp_path: Path) -> None:
    paths = write_family(tmp_path, family())
    source = SafetensorsFile(paths[1])
    buffer = torch.empty(3 * 128 * 2, dtype=torch.uint8)
    rows = source.get_rows_into("embed", 5, 8, buffer)
    assert rows.data_ptr() == buffer.data_ptr()
    assert torch.equal(rows, source.get_rows("embed", 5, 8))
    with pytest.raises(SourceError, match="wrong size"):
        source.get_rows_into("embed", 5, 9, buffer)


@pytest.mark.parametrize("compute", ["bfloat16", None])
@pytest.mark.parametrize("method", ["passthrough", "nearswap"])
def test_elementwise_methods_slice_in_their_own_compute_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compute: str | None, method: str
) -> None:
    """mergekit configs compute in their dtype (here bf16, or None: as stored): an
    elementwise method is sliced there too, with the whole tensor's bytes."""
    paths = write_family(tmp_path / "in", family())
    kwargs: dict[str, Any] = {"compute_dtype": compute, "device": "cpu", "progress": False}
    if method == "passthrough":
        kwargs |= {"model_params": [{"scale": 0.7}]}
    else:
        kwargs |= {"base": paths[0], "params": {"t": 0.05}}
    outputs = {}
    for label, chunk in (("whole", 1 << 40), ("sliced", SLICE)):
        monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
        out = tmp_path / label
        mergeops.merge_files(method, [paths[1]], out_dir=out, **kwargs)
        outputs[label] = load_file(next(out.glob("*.safetensors")))
    sliced: list[str] = []
    original = chunking.ChunkedMerge.run

    def spy(self: chunking.ChunkedMerge, *args: Any) -> Any:
        sliced.append(self.key)
        return original(self, *args)

    monkeypatch.setattr(chunking.ChunkedMerge, "run", spy)
    again = tmp_path / "again"
    mergeops.merge_files(method, [paths[1]], out_dir=again, **kwargs)
    assert sorted(sliced) == ["embed", "mlp"]
    assert outputs["whole"]["embed"].dtype == torch.bfloat16
    for key, tensor in outputs["whole"].items():
        got = outputs["sliced"][key]
        assert torch.equal(tensor.view(torch.uint8), got.view(torch.uint8)), key
