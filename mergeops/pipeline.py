"""The overlapped device pipeline for elementwise (chunkable) merges: which slice is copied,
merged and written when, which buffer it uses, and which event each step waits for.

Every float tensor is cut into slices of about ``SLICE_BYTES`` float32 per input; each slice
goes through four steps, on three streams of a ``Backend`` (``mergeops.cuda_stream`` on a GPU;
a fake in the tests, which runs the same schedule on the CPU in adversarial orders):

1. upload: the host copies the slice's raw input rows (read ahead by the ``Prefetcher``) into
   reused pinned buffers, then the ``h2d`` stream copies them to the device;
2. compute (the ``compute`` stream): cast to float32, ``merge_rows``, cast to the output dtype
   on the device, and count non-finite outputs and inputs, still on the device;
3. download (the ``d2h`` stream): device output and counts into pinned buffers;
4. finish (host): hand the pinned output slice to the writer at its byte offset (a sink that
   takes slices: ``write_rows``, written by the writer's thread while the device goes on), or
   copy it into a host output tensor handed over whole after its last slice
   (``mergeops.pipeline_output``); a tensor with NaN/Inf is refused after its last slice.

Issued in the order upload(j), compute(j-1), download(j-1), finish(j-2), slice j's host-to-device
copy overlaps slice j-1's compute and slice j-2's device-to-host copy. Buffers rotate over
``slots`` (>= 2) sets; before reusing set s: the host waits until its last upload finished
(pinned input), the h2d stream waits for its last compute (device input), the compute stream
waits for its last download (device output); the pinned output is free because its slice was
finished an iteration earlier, and the host waits for the writer to release it (it wrote the
slice) before issuing the download that refills it. Host memory is the slots' pinned buffers
and the reads in flight, never a whole tensor (a method's whole-tensor statistics are
uploaded slice by slice). Tensors that are not sliced (scalars, integer buffers) are
host jobs run at their finish turn, so the sink sees tensors in the plan's order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mergeops import finite
from mergeops.chunking import _Rows, row_ranges
from mergeops.device_stats import tensor_stats
from mergeops.methods import base as mb
from mergeops.pipeline_output import PinnedRelease, PipelineOutput
from mergeops.plan import MergePlan
from mergeops.prefetch import Pending, Prefetcher, Read
from mergeops.slice_io import RowSink

SLICE_BYTES = 32 * 1024 * 1024
"""Float32 bytes per input slice on the device (large: fewer, longer copies and kernels)."""
STREAMS = ("h2d", "compute", "d2h")
SLOTS = 2
"""Buffer sets in rotation (2 is enough for the issue order above; more only adds slack)."""


class Backend(Protocol):
    """Streams, events and buffers; ``run`` enqueues ``work`` on a stream."""

    def stream(self, role: str) -> Any: ...
    def run(self, stream: Any, work: Callable[[], None]) -> None: ...
    def record(self, stream: Any) -> Any: ...
    def wait(self, stream: Any, event: Any) -> None: ...
    def host_wait(self, event: Any) -> None: ...
    def pinned(self, nbytes: int) -> torch.Tensor: ...
    def device_buffer(self, nbytes: int) -> torch.Tensor: ...
    def drain(self) -> None: ...


@dataclass
class Job:
    """One slice (rows ``start:stop`` of ``key``), or a host job (``host`` set)."""

    key: str
    start: int = 0
    stop: int = 0
    first: bool = False
    last: bool = False
    host: Callable[[], None] | None = None


def slice_rows(shape: Sequence[int], slice_bytes: int = SLICE_BYTES) -> int:
    """Rows per device slice of a tensor of ``shape`` (ndim >= 1)."""
    return max(1, slice_bytes // (max(1, math.prod(shape[1:])) * 4))


@dataclass
class _Slot:
    """One buffer set and the events of its last use."""

    pinned_in: list[torch.Tensor]
    device_in: list[torch.Tensor]
    device_out: torch.Tensor
    pinned_out: torch.Tensor
    device_counts: torch.Tensor
    pinned_counts: torch.Tensor
    uploaded: Any = None
    computed: Any = None
    downloaded: Any = None
    released: PinnedRelease = field(default_factory=PinnedRelease)  # pinned_out, by the writer


def _view(buffer: torch.Tensor, dtype: torch.dtype, numel: int) -> torch.Tensor:
    return buffer[: numel * dtype.itemsize].view(dtype)


class SlicePipeline:
    """Runs a chunkable plan's merge pass through ``backend`` (see the module docstring)."""

    def __init__(
        self,
        plan: MergePlan,
        backend: Backend,
        prefetcher: Prefetcher,
        *,
        host_job: Callable[[str], Callable[[], None]],
        sink: Callable[[str, torch.Tensor], None],
        rows: RowSink | None = None,
        written: Callable[[str], None] | None = None,
        slots: int | None = None,
        slice_bytes: int | None = None,
    ) -> None:
        """``sink`` gets whole merged tensors, unless ``rows`` takes them slice by slice
        (then ``written(key)`` says a tensor's last slice was handed over)."""
        slots = SLOTS if slots is None else slots
        if slots < 2:
            raise ValueError(f"the pipeline needs at least 2 buffer slots, got {slots}")
        self.plan, self.backend, self.prefetcher = plan, backend, prefetcher
        self.output = PipelineOutput(plan.ctx, sink, rows, written)
        self.sources = [*plan.models, *([plan.base] if plan.base is not None else [])]
        self.roles = [f"model '{m.name}'" for m in plan.models] + (
            ["base"] * (plan.base is not None)
        )
        self.slice_bytes = slice_bytes or SLICE_BYTES
        self.jobs = list(self._jobs(host_job, self.slice_bytes))
        self.streams = {role: backend.stream(role) for role in STREAMS}
        self.slots = [self._slot() for _ in range(slots)]
        self.bytes_read = 0
        self.issued: list[tuple[str, int]] = []
        self._stats: dict[str, list[Any]] = {}

    def _jobs(
        self, host_job: Callable[[str], Callable[[], None]], slice_bytes: int
    ) -> Iterator[Job]:
        for key in self.plan.keys:
            meta = self.plan.metas[key]
            if not meta.dtype.is_floating_point or not meta.shape or not math.prod(meta.shape):
                yield Job(key, host=host_job(key))
                continue
            ranges = list(row_ranges(meta.shape[0], slice_rows(meta.shape, slice_bytes)))
            for index, (start, stop) in enumerate(ranges):
                yield Job(key, start, stop, first=index == 0, last=index == len(ranges) - 1)

    def _numel(self, job: Job) -> int:
        return (job.stop - job.start) * math.prod(self.plan.metas[job.key].shape[1:])

    def _slot(self) -> _Slot:
        slices = [j for j in self.jobs if j.host is None]
        in_bytes = max((self._numel(j) * self.plan.metas[j.key].dtype.itemsize for j in slices),
                       default=0)  # fmt: skip
        out_bytes = max((self._numel(j) * self._out_dtype(j.key).itemsize for j in slices),
                        default=0)  # fmt: skip
        b, count = self.backend, len(self.sources)
        return _Slot([b.pinned(in_bytes) for _ in range(count)],
                     [b.device_buffer(in_bytes) for _ in range(count)],
                     b.device_buffer(out_bytes), b.pinned(out_bytes),
                     b.device_buffer(8 * (count + 1)), b.pinned(8 * (count + 1)))  # fmt: skip

    def _out_dtype(self, key: str) -> torch.dtype:
        return self.plan.ctx.out_dtype or self.plan.metas[key].dtype

    def _batches(self) -> Iterator[list[Read]]:
        readers: dict[str, list[_Rows]] = {}
        for job in self.jobs:
            if job.host is not None:
                yield []
                continue
            if job.first:
                readers = {job.key: [_Rows(s, job.key) for s in self.sources]}
            size = self._numel(job) * self.plan.metas[job.key].dtype.itemsize
            yield [Read(size, _rows_fetch(r, job.start, job.stop)) for r in readers[job.key]]

    def run(self) -> None:
        """Merge every tensor; the sink gets each finished tensor (CPU, output dtype)."""
        count = len(self.jobs)
        with closing(self.prefetcher.stream(self._batches())) as reads:
            try:
                for j in range(count + 2):
                    if j < count:
                        self._upload(j, next(reads))
                    if 1 <= j <= count:
                        self._compute(j - 1)
                        self._download(j - 1)
                    if j >= 2:
                        self._finish(j - 2)
            finally:
                self.backend.drain()

    def _upload(self, j: int, pending: list[Pending]) -> None:
        job, slot = self.jobs[j], self.slots[j % len(self.slots)]
        if job.host is not None:
            return
        dtype, numel = self.plan.metas[job.key].dtype, self._numel(job)
        raws = [p.result() for p in pending]
        if slot.uploaded is not None:
            self.backend.host_wait(slot.uploaded)  # the pinned inputs are free again
        for raw, pinned in zip(raws, slot.pinned_in, strict=True):
            self.bytes_read += raw.numel() * raw.element_size()
            _view(pinned, dtype, numel).copy_(raw.reshape(-1))
        stream = self.streams["h2d"]
        if slot.computed is not None:
            self.backend.wait(stream, slot.computed)  # the device inputs are free again

        def copy() -> None:
            for src, dst in zip(slot.pinned_in, slot.device_in, strict=True):
                _view(dst, dtype, numel).copy_(_view(src, dtype, numel), non_blocking=True)

        self.backend.run(stream, copy)
        slot.uploaded = self.backend.record(stream)
        self.issued.append(("upload", j))

    def _compute(self, j: int) -> None:
        job, slot = self.jobs[j], self.slots[j % len(self.slots)]
        if job.host is not None:
            return
        plan, key = self.plan, job.key
        shape = tuple(plan.metas[key].shape)
        if job.first:
            step = slice_rows(shape, self.slice_bytes)
            stats, read = tensor_stats(plan, self.sources, self.roles, key, step)
            self._stats[key], self.bytes_read = stats, self.bytes_read + read
        stats = self._stats[key]
        stream = self.streams["compute"]
        self.backend.wait(stream, slot.uploaded)
        if slot.downloaded is not None:
            self.backend.wait(stream, slot.downloaded)  # the device output is free again
        dtype, numel, out_dtype = plan.metas[key].dtype, self._numel(job), self._out_dtype(key)
        rows = (job.stop - job.start, *shape[1:])

        def merge() -> None:
            loaded = [_view(b, dtype, numel).reshape(rows).to(torch.float32, copy=True)
                      for b in slot.device_in]  # fmt: skip
            count = len(plan.models)
            base = loaded[count] if plan.base is not None else None
            inputs = mb.TensorInputs(name=key, models=loaded[:count], base=base)
            flags = [finite.input_flag(t) for t in loaded]
            offset = job.start * math.prod(shape[1:])
            merged = plan.method.merge_rows(inputs, stats, offset, plan.ctx)  # type: ignore[attr-defined]
            if tuple(merged.shape) != rows:
                raise mb.MergeError(f"method '{plan.method.name}' produced shape "
                                    f"{tuple(merged.shape)} for rows {job.start}:{job.stop} of "
                                    f"'{key}', expected {rows}")  # fmt: skip
            out = _view(slot.device_out, out_dtype, numel)
            out.copy_(merged.reshape(-1))
            counts = _view(slot.device_counts, torch.int64, len(flags) + 1)
            counts[0] = finite.nonfinite_count(out)
            counts[1:] = torch.stack(flags).to(torch.int64)

        self.backend.run(stream, merge)
        slot.computed = self.backend.record(stream)
        self.issued.append(("compute", j))

    def _download(self, j: int) -> None:
        job, slot = self.jobs[j], self.slots[j % len(self.slots)]
        if job.host is not None:
            return
        stream, numel, out_dtype = self.streams["d2h"], self._numel(job), self._out_dtype(job.key)
        self.backend.wait(stream, slot.computed)
        slot.released.wait()  # the writer wrote the slice it was handed from pinned_out

        def copy() -> None:
            _view(slot.pinned_out, out_dtype, numel).copy_(
                _view(slot.device_out, out_dtype, numel), non_blocking=True
            )
            slot.pinned_counts.copy_(slot.device_counts, non_blocking=True)

        self.backend.run(stream, copy)
        slot.downloaded = self.backend.record(stream)
        self.issued.append(("download", j))

    def _finish(self, j: int) -> None:
        job, slot = self.jobs[j], self.slots[j % len(self.slots)]
        self.issued.append(("finish", j))
        if job.host is not None:
            job.host()
            return
        key, numel, out_dtype = job.key, self._numel(job), self._out_dtype(job.key)
        self.backend.host_wait(slot.downloaded)
        counts = _view(slot.pinned_counts, torch.int64, len(self.sources) + 1).tolist()
        for role, good in zip(self.roles, counts[1:], strict=True):
            if not good:
                raise mb.MergeError(f"tensor '{key}' of {role} contains NaN or Inf")
        shape = tuple(self.plan.metas[key].shape)
        data = slot.pinned_out[: numel * out_dtype.itemsize]
        self.output.put(key, shape, out_dtype, job.start, data, bad=counts[0], first=job.first,
                        last=job.last, release=slot.released)  # fmt: skip
        if job.last:
            self._stats.pop(key, None)


def _rows_fetch(rows: _Rows, start: int, stop: int) -> Callable[[], torch.Tensor]:
    return lambda: rows.get(start, stop)
