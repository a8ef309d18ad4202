"""The merge pass of a routed plan (mergekit slices, gradients, filters, vocabulary remaps):
each output tensor with its own inputs and context.

A large tensor of an elementwise (``chunkable``) method, merged without a transform in
float32 (or in another explicit compute dtype, for the methods ``chunking.any_dtype``
allows), goes through the same row-chunked merge as plain plans (``mergeops.chunking``), so
peak memory stays a few slices per input; the rest is read whole (with read-ahead) and
handed to ``merge_tensor``. Chunked tensors reach a sink that takes slices slice by slice
(``mergeops.emit.emit_chunked``).
"""

from __future__ import annotations

import torch

from mergeops.chunking import ChunkedMerge, ChunkJob, any_dtype, rows_for
from mergeops.emit import TensorSink, emit, emit_chunked, progress_bar
from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.prefetch import Prefetcher
from mergeops.routing import TensorRoute, passthrough, stream_routes
from mergeops.slice_io import BufferPool


def route_rows(method: mb.MergeMethod, route: TensorRoute) -> int:
    """Rows per slice for ``route``, or 0 when it is merged whole."""
    compute = route.ctx.compute_dtype
    if route.transform is not None or compute is None:  # None: inputs as stored, maybe mixed
        return 0
    if compute != torch.float32 and not any_dtype(method, route.ctx):
        return 0
    if not route.meta.dtype.is_floating_point:
        return 0
    return rows_for(method, tuple(route.meta.shape), ctx=route.ctx)


def route_job(method: mb.MergeMethod, route: TensorRoute) -> ChunkJob:
    """The chunk job of one route: its inputs by source and tensor name."""
    roles = route.roles()
    models = [
        (source, name, role) for (source, name), role in zip(route.inputs, roles, strict=False)
    ]
    base_role = roles[-1] if route.base is not None else "base"
    return ChunkJob(route.key, route.meta, models, route.base, method, route.ctx, base_role)


def run_routed(
    plan: MergePlan,
    sink: TensorSink,
    prefetcher: Prefetcher,
    progress: bool,
    pool: BufferPool | None = None,
) -> int:
    """Merge a routed plan into ``sink``; returns the bytes read (``pool``: reused slice
    buffers, shared with the rest of the merge)."""
    pool = pool if pool is not None else BufferPool()
    method = plan.method
    assert isinstance(method, mb.StreamingMethod) and plan.routes is not None
    rows = {route.key: route_rows(method, route) for route in plan.routes}
    counter = [0]
    stream = stream_routes(plan.routes, prefetcher, counter, read=lambda r: not rows[r.key])
    desc = f"{method.name}: merging"
    for route, inputs in progress_bar(stream, len(plan.routes), desc, progress):
        if not route.meta.dtype.is_floating_point:
            sink(route.key, None, passthrough(route))
        elif rows[route.key]:
            chunked = ChunkedMerge(route_job(method, route), rows[route.key], prefetcher, pool)
            emit_chunked(plan, sink, chunked)
            counter[0] += chunked.bytes_read
        else:
            assert inputs is not None
            result = method.merge_tensor(inputs, route.ctx)
            emit(plan, sink, route.key, result.merged, result.extras)
    method.finish(plan.ctx)
    return counter[0]
