"""Reading one tensor name's inputs for the engine: on the device in the compute dtype (float32
unless a mergekit config says otherwise), checked finite.

``TensorReader.stream(keys)`` walks tensor names with the next names' raw reads running ahead
in the shared ``Prefetcher`` (raw bytes only: casts and checks happen on the merging thread, in
input order, so errors and results are those of a plain sequential read). On CUDA the raw
tensors are pinned in the reader thread and copied with ``non_blocking``, then cast on the
device (a blocking copy would cast on the CPU and move twice the bytes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing

import torch

from mergeops import finite
from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.prefetch import Pending, Prefetcher, Read
from mergeops.slice_io import BufferPool
from mergeops.sources import TensorSource


def _nbytes(plan: MergePlan, key: str) -> int:
    meta = plan.metas[key]
    return math.prod(meta.shape) * meta.dtype.itemsize


class TensorReader:
    """Reads tensor names' inputs (models, base, side inputs) for one plan."""

    def __init__(self, plan: MergePlan, prefetcher: Prefetcher) -> None:
        self.plan = plan
        self.prefetcher = prefetcher
        self.bytes_read = 0
        self.pool = BufferPool()
        """Slice buffers reused by every row-chunked tensor of the merge."""
        self._pin = plan.ctx.device.type == "cuda"

    def _roles(self) -> list[str]:
        plan = self.plan
        roles = [f"model '{m.name}'" for m in plan.models]
        if plan.base is not None:
            roles.append("base")
        for kind, sources in plan.side.items():
            roles.extend(f"{kind} of model '{s.name}'" for s in sources)
        return roles

    def _raw(self, source: TensorSource, key: str) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            tensor = source.get(key)
            return tensor.pin_memory() if self._pin else tensor

        return fetch

    def _side(self, kind: str, source: TensorSource, key: str) -> Callable[[], torch.Tensor]:
        plan = self.plan
        return lambda: plan.method.read_side_input(kind, source, key, plan.ctx.device)

    def reads(self, key: str) -> list[Read]:
        """The reads of ``key``'s inputs, in ``_roles`` order."""
        plan, size = self.plan, _nbytes(self.plan, key)
        sources = [*plan.models, *([plan.base] if plan.base is not None else [])]
        reads = [Read(size, self._raw(source, key)) for source in sources]
        for kind, side in plan.side.items():
            reads.extend(Read(math.prod(plan.metas[key].shape) * 4, self._side(kind, s, key))
                         for s in side)  # fmt: skip
        return reads

    def assemble(self, key: str, pending: list[Pending]) -> mb.TensorInputs:
        """Wait for ``key``'s reads in order and build float32 device inputs (checked)."""
        device = self.plan.ctx.device
        loaded: list[torch.Tensor] = []
        for item in pending:
            raw = item.result()
            self.bytes_read += raw.numel() * raw.element_size()
            on_device = raw.to(device, non_blocking=True)
            dtype = self.plan.ctx.compute_dtype or on_device.dtype  # None: as stored (mergekit)
            loaded.append(on_device if on_device.dtype == dtype else on_device.to(dtype))
        finite.check_inputs(key, self._roles(), [finite.input_flag(t) for t in loaded])
        count = len(self.plan.models)
        base = loaded[count] if self.plan.base is not None else None
        rest = loaded[count + (base is not None) :]
        side: dict[str, list[torch.Tensor]] = {}
        for kind, sources in self.plan.side.items():
            side[kind], rest = rest[: len(sources)], rest[len(sources) :]
        return mb.TensorInputs(name=key, models=loaded[:count], base=base, side=side)

    def read(self, key: str) -> mb.TensorInputs:
        """``key``'s inputs, read now."""
        return self.assemble(key, [_Now(r.fetch) for r in self.reads(key)])

    def stream(
        self, keys: Iterable[str], *, read: Callable[[str], bool] = lambda key: True
    ) -> Iterator[tuple[str, mb.TensorInputs | None]]:
        """(key, inputs) for each key, later keys read ahead; inputs are None (nothing read)
        for keys where ``read(key)`` is false (the caller handles those itself)."""
        ordered = list(keys)
        wanted = [read(key) for key in ordered]
        batches = (self.reads(k) if w else [] for k, w in zip(ordered, wanted, strict=True))
        with closing(self.prefetcher.stream(batches)) as stream:
            for key, want, pending in zip(ordered, wanted, stream, strict=True):
                yield key, self.assemble(key, pending) if want else None


class _Now:
    def __init__(self, fetch: Callable[[], torch.Tensor]) -> None:
        self._fetch = fetch

    def result(self) -> torch.Tensor:
        return self._fetch()
