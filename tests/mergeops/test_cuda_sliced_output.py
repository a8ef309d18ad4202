"""The device pipeline writes its output in row slices (``mergeops.pipeline_output``), tested
on the CPU: the pipeline runs through the fake backend of ``test_cuda_pipeline`` (each stream's
work deferred and run in adversarial orders), into a real folder (``ShardedWriter`` and its
background thread). The shards must be byte-identical to the CPU merge's, every large tensor
must reach the writer in slices from the slots' reused pinned buffers (never whole), a slow
writer must not see its buffer refilled before it wrote it, and any failure must leave no
output."""

from __future__ import annotations

import itertools
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking, engine, pipeline
from mergeops.io.dir_sink import DirSink
from mergeops.io.streamed import StreamedShards
from mergeops.methods.base import MergeError
from mergeops.pipeline_output import PinnedRelease
from tests.mergeops.test_cuda_pipeline import STREAMS, FakeBackend
from tests.mergeops.test_prefetch import family, write_family

CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {"weight": [1.0, 0.8, 0.6]}),
    ("task_arithmetic", {"weight": [1.0, 0.8, 0.6], "lambda": 0.7}),
    ("ties", {"density": [0.5, 0.3, 1.0]}),
]
SLICED = {"embed": 12, "mlp": 8, "norm": 1}
"""Slices per tensor at 4 KiB per float32 input slice: embed (96, 128) in 8 rows, mlp (40, 192)
in 5 rows, norm (128,) in one; only the integer buffer "ids" reaches the writer whole."""


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("sliced"), family())


class Spy:
    """Records what reaches the folder sink (the real calls go through unchanged)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[tuple[str, int, int, int]] = []
        self.whole: list[str] = []
        write_rows, call = DirSink.write_rows, DirSink.__call__

        def spy_rows(sink: DirSink, name: str, offset: int, data: torch.Tensor, *a: Any) -> None:
            self.rows.append((name, offset, data.numel(), data.untyped_storage().data_ptr()))
            write_rows(sink, name, offset, data, *a)

        def spy_call(sink: DirSink, name: str, stream: str | None, tensor: torch.Tensor) -> None:
            self.whole.append(name)
            call(sink, name, stream, tensor)

        monkeypatch.setattr(DirSink, "write_rows", spy_rows)
        monkeypatch.setattr(DirSink, "__call__", spy_call)


def _merge(paths: list[Path], out: Path, method: str, params: dict[str, Any], **kw: Any) -> Path:
    base = paths[0] if method != "linear" else None
    mergeops.merge_files(method, paths[1:], base=base, out_dir=out, device="cpu",
                         progress=False, **params, **kw)  # fmt: skip
    return out


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _use_fake(monkeypatch: pytest.MonkeyPatch, backend: FakeBackend | None = None) -> FakeBackend:
    backend = backend or FakeBackend(STREAMS)
    monkeypatch.setattr(engine, "pipeline_backend", lambda plan: backend)
    return backend


@pytest.fixture(autouse=True)
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "SLICE_BYTES", 4096)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize(("eager", "dtype"), [((), None), (("d2h",), "float32")])
def test_sliced_output_is_byte_identical_to_the_cpu_merge(
    paths: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict[str, Any],
    eager: tuple[str, ...],
    dtype: str | None,
) -> None:
    expected = _shard_bytes(_merge(paths, tmp_path / "cpu", method, params, dtype=dtype))
    backend = _use_fake(monkeypatch, FakeBackend(eager))
    spy = Spy(monkeypatch)
    got = _shard_bytes(_merge(paths, tmp_path / "fake", method, params, dtype=dtype))
    assert got == expected
    assert backend.buffers  # merged by the pipeline, not the CPU path
    assert spy.whole == ["ids"]
    itemsize = 4 if dtype == "float32" else 2  # the family is stored in bfloat16
    for name, count in SLICED.items():
        sent = [(offset, size) for key, offset, size, _ in spy.rows if key == name]
        assert len(sent) == count
        offsets = [offset for offset, _ in sent]
        assert offsets == sorted(offsets) and offsets[0] == 0  # in order, back to back
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(sent))
        assert (
            sum(size for _, size in sent) == torch.Size(family()[0][name].shape).numel() * itemsize
        )
    buffers = {ptr for *_, ptr in spy.rows}
    assert len(buffers) == pipeline.SLOTS  # the slots' pinned outputs, reused by every slice


def _gated_first_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer writes the first slice of 'embed' (in slot 0) only once the pipeline either
    blocks on a held buffer's release or has issued slice 2's download into that slot:
    without the wait, the slot is refilled first, every time."""
    gate, first = threading.Event(), [True]
    write_rows, wait, download = StreamedShards.write_rows, PinnedRelease.wait, _DOWNLOAD[0]

    def gated(shards: StreamedShards, name: str, offset: int, data: torch.Tensor) -> None:
        if name == "embed" and first[0]:
            first[0] = False
            assert gate.wait(timeout=10)
        write_rows(shards, name, offset, data)

    def waiting(release: PinnedRelease) -> None:
        if release.held:  # the pipeline blocks until the writer wrote: let it write
            gate.set()
        wait(release)

    def issued(self: pipeline.SlicePipeline, j: int) -> None:
        download(self, j)
        if j == 2:  # embed's slice 2, in slot 0 again
            gate.set()

    monkeypatch.setattr(StreamedShards, "write_rows", gated)
    monkeypatch.setattr(PinnedRelease, "wait", waiting)
    monkeypatch.setattr(pipeline.SlicePipeline, "_download", issued)


_DOWNLOAD = [pipeline.SlicePipeline._download]


def test_a_slow_writer_keeps_its_buffer_until_it_wrote_it(
    paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = CASES[1][1]
    expected = _shard_bytes(_merge(paths, tmp_path / "cpu", "task_arithmetic", params))
    _use_fake(monkeypatch)  # every copy runs as soon as it is issued
    with monkeypatch.context() as patch:
        _gated_first_write(patch)
        assert _shard_bytes(_merge(paths, tmp_path / "ok", "task_arithmetic", params)) == expected
    with monkeypatch.context() as patch:
        _gated_first_write(patch)
        patch.setattr(PinnedRelease, "wait", lambda self: None)  # the wait the test guards
        got = _shard_bytes(_merge(paths, tmp_path / "bad", "task_arithmetic", params))
    assert got != expected  # slice 0's buffer was refilled by slice 2 before it was written


def test_a_failed_write_stops_the_merge_and_leaves_nothing(
    paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, count = StreamedShards.write_rows, [0]

    def failing(shards: StreamedShards, name: str, offset: int, data: torch.Tensor) -> None:
        count[0] += 1
        if count[0] == 3:
            raise OSError("No space left on device (test)")
        original(shards, name, offset, data)

    monkeypatch.setattr(StreamedShards, "write_rows", failing)
    _use_fake(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):  # and no wait for a buffer never freed
        _merge(paths, out, "ties", CASES[2][1])
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not [t for t in threading.enumerate() if t.name == "mergeops-write"]


def test_a_non_finite_slice_is_not_written_and_the_output_is_discarded(
    paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use_fake(monkeypatch)
    spy = Spy(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"merged tensor 'embed' of method 'linear' has \d+ NaN"):
        _merge(paths, out, "linear", {"weight": [1.0, float("inf"), 1.0]})
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not [row for row in spy.rows if row[0] == "embed"]


def test_whole_tensor_statistics_are_uploaded_a_slice_at_a_time(
    paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spans: dict[str, list[int]] = {}
    original = chunking._Rows.get

    def get(rows: chunking._Rows, start: int, stop: int) -> torch.Tensor:
        spans.setdefault(rows.key, []).append(stop - start)
        return original(rows, start, stop)

    monkeypatch.setattr(chunking._Rows, "get", get)
    _use_fake(monkeypatch)
    _merge(paths, tmp_path / "out", "ties", {"density": 0.5})  # TIES: whole-tensor cuts
    assert max(spans["embed"]) == 8 and max(spans["mlp"]) == 5  # never a whole tensor
    assert len(spans["embed"]) == 4 * 12 * 2  # 4 inputs, 12 slices, cuts + merge pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [256, 3 * 64 * 1024])  # one block, or 1.5 device blocks
def test_the_blocked_kernels_run_on_a_device_other_than_the_cpu(
    dtype: torch.dtype, rows: int
) -> None:
    """On CUDA the pipeline merges with the CPU's blocked kernels (the same elementwise ops in
    the same order, hence the same bits); 'meta' tensors stand in for a device here: any
    tensor left on the CPU would fail with a device mismatch."""
    from mergeops.ops.basic import weighted_average
    from mergeops.ops.blocked_combine import blockable, blocked_combine

    base = torch.empty(rows, 64, dtype=dtype, device="meta")
    taus = [torch.empty_like(base) for _ in range(3)]
    assert blockable(base, taus) and not blockable(base, [torch.empty(base.shape, dtype=dtype)])
    for consensus in (True, False):
        out = blocked_combine(base, taus, [1.0, 0.5, 0.3], consensus=consensus, normalize=True,
                              scale=0.7)  # fmt: skip
        assert out.device.type == "meta" and out.dtype == dtype
    floats = [t.float() for t in taus]
    assert weighted_average(floats, [1.0, 2.0, 3.0]).device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("slice_bytes", [4096, 32 * 1024 * 1024])
def test_on_cuda_the_sliced_output_is_byte_identical_to_the_cpu_merge(
    paths: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    params: dict[str, Any],
    slice_bytes: int,
) -> None:
    expected = _shard_bytes(_merge(paths, tmp_path / "cpu", method, params))
    monkeypatch.setattr(pipeline, "SLICE_BYTES", slice_bytes)  # many slices, or one per tensor
    spy = Spy(monkeypatch)
    base = paths[0] if method != "linear" else None
    mergeops.merge_files(method, paths[1:], base=base, out_dir=tmp_path / "cuda", device="cuda",
                         progress=False, **params)  # fmt: skip
    assert _shard_bytes(tmp_path / "cuda") == expected
    assert spy.whole == ["ids"] and {row[0] for row in spy.rows} == set(SLICED)


def test_each_slice_is_written_while_the_next_one_is_merged(
    paths: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[pipeline.SlicePipeline] = []
    run, write_rows = pipeline.SlicePipeline.run, DirSink.write_rows
    writes: list[tuple[int, list[tuple[str, int]]]] = []

    def spy_run(self: pipeline.SlicePipeline) -> None:
        seen.append(self)
        run(self)

    def spy_rows(sink: DirSink, name: str, offset: int, data: torch.Tensor, *a: Any) -> None:
        jobs = seen[0].jobs
        start = offset // (math.prod(family()[0][name].shape[1:]) * 2)  # bf16 output
        index = next(j for j, job in enumerate(jobs) if job.key == name and job.start == start)
        writes.append((index, list(seen[0].issued)))
        write_rows(sink, name, offset, data, *a)

    monkeypatch.setattr(pipeline.SlicePipeline, "run", spy_run)
    monkeypatch.setattr(DirSink, "write_rows", spy_rows)
    _use_fake(monkeypatch, FakeBackend())
    _merge(paths, tmp_path / "out", "ties", CASES[2][1])
    assert len(writes) == sum(SLICED.values())
    slices = {j for j, job in enumerate(seen[0].jobs) if job.host is None}
    for index, issued in writes:
        if index + 1 in slices:  # the next slice's merge is already issued when this one goes
            assert ("compute", index + 1) in issued
        assert ("download", index + 2) not in issued  # its buffer is not refilled yet
