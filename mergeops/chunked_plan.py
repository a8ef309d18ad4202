"""The chunked tensors of a plain plan, merged in order with each one's first fetches started
while the tensor before it merges (``ChunkedTensors``)."""

from __future__ import annotations

import functools
import itertools

from mergeops.chunking import ChunkedMerge, ChunkJob
from mergeops.plan import MergePlan
from mergeops.prefetch import Prefetcher
from mergeops.slice_io import BufferPool


def plan_job(plan: MergePlan, key: str) -> ChunkJob:
    """The chunk job of tensor ``key`` of a plain (unrouted) plan."""
    models = [(m, key, f"model '{m.name}'") for m in plan.models]
    base = (plan.base, key) if plan.base is not None else None
    return ChunkJob(key, plan.metas[key], models, base, plan.method, plan.ctx)


class ChunkedTensors:
    """The ``ChunkedMerge`` of each chunked tensor of a plain plan, in plan order; each one's
    first slice reads start once the previous one's last read is submitted (``prime``: remote
    inputs), so its fetches no longer start cold after the tensor before it is merged. Sources
    without row reads (read whole on construction) are not primed. A context manager: tensors
    primed and never merged (the merge failed) are closed on exit."""

    def __init__(
        self, plan: MergePlan, rows_of: dict[str, int], prefetcher: Prefetcher, pool: BufferPool
    ) -> None:
        self._plan, self._rows_of, self._prefetcher, self._pool = plan, rows_of, prefetcher, pool
        keys = [key for key in plan.keys if rows_of.get(key)]
        self._following = dict(itertools.pairwise(keys))
        sources = [*plan.models, *([plan.base] if plan.base is not None else [])]
        self._primable = all(getattr(s, "get_rows", None) is not None for s in sources)
        self._ahead: ChunkedMerge | None = None  # the next tensor, primed (one at most)

    def take(self, key: str) -> ChunkedMerge:
        """Tensor ``key``'s merge (primed or fresh), set to prime the next chunked tensor."""
        ahead, self._ahead = self._ahead, None
        chunked = ahead if ahead is not None and ahead.key == key else self._make(key)
        following = self._following.get(key)
        if following is not None and self._primable:
            chunked.after_reads(functools.partial(self._prime, following))
        return chunked

    def _make(self, key: str) -> ChunkedMerge:
        return ChunkedMerge(plan_job(self._plan, key), self._rows_of[key], self._prefetcher,
                            self._pool)  # fmt: skip

    def _prime(self, key: str) -> None:
        self._ahead = self._make(key)
        self._ahead.prime()

    def __enter__(self) -> ChunkedTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.close()
