"""The streaming merge engine: reads each tensor from every input, hands it to the method,
casts and writes the result, and drops it. It holds no method logic.

Peak memory is a few tensors times the number of inputs. Methods that need model-wide
statistics get their first pass(es) here; whole-model methods get the sources directly.
The next tensor's (or slice's) inputs are read ahead in a small thread pool
(``mergeops.prefetch``); on CUDA, elementwise methods run through the overlapped copy/compute
pipeline (``mergeops.pipeline``). Every floating output is checked finite, on its device,
before it reaches the writer (``mergeops.finite``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mergeops.chunked_plan import ChunkedTensors
from mergeops.chunking import any_dtype, chunk_rows
from mergeops.device import dtype_name
from mergeops.emit import TensorSink, emit_chunked
from mergeops.emit import emit as _emit
from mergeops.emit import out_dtype as _out_dtype
from mergeops.emit import progress_bar as _progress
from mergeops.heap import heap_frozen
from mergeops.io.dir_sink import DirSink
from mergeops.io.streamed import TensorSpec
from mergeops.io.writer import staged_output, swap_into_place
from mergeops.methods import base as mb
from mergeops.pipeline import Backend, SlicePipeline
from mergeops.plan import MergePlan
from mergeops.prefetch import Prefetcher
from mergeops.reader import TensorReader
from mergeops.reshape import output_metas
from mergeops.routed_merge import run_routed
from mergeops.slice_io import row_sink
from mergeops.spill import scratch_under


@dataclass
class MergeResult:
    """What ``merge_files`` produced."""

    out_dir: Path
    files: list[Path]
    extra_outputs: dict[str, Path] = field(default_factory=dict)
    tensor_count: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    state_path: Path | None = None
    method: str = ""


def _float_keys(plan: MergePlan) -> list[str]:
    return [k for k in plan.keys if plan.metas[k].dtype.is_floating_point]


def _fp32_compute(plan: MergePlan) -> bool:
    return plan.ctx.compute_dtype == torch.float32


def _to_compute(plan: MergePlan, key: str, inputs: mb.TensorInputs) -> mb.TensorInputs:
    """``inputs`` (read as float32) in the plan's compute dtype (None: the stored dtype);
    exact, since the stored values came from that dtype or a narrower one."""
    dtype = plan.ctx.compute_dtype or plan.metas[key].dtype
    if dtype == torch.float32:
        return inputs
    cast = [t.to(dtype) for t in inputs.models]
    base = inputs.base.to(dtype) if inputs.base is not None else None
    side = {k: [t.to(dtype) for t in v] for k, v in inputs.side.items()}
    return mb.TensorInputs(name=inputs.name, models=cast, base=base, side=side)


def _load_state(plan: MergePlan) -> None:
    if mb.Need.STATE not in plan.method.needs:
        return
    path = plan.state_path
    if path is not None and path.exists():
        plan.ctx.state = plan.method.load_state(path, plan.ctx)
    else:
        plan.ctx.state = plan.method.new_state(plan.ctx)


def _stream(plan: MergePlan, sink: TensorSink, reader: TensorReader, progress: bool) -> None:
    method = plan.method
    assert isinstance(method, mb.StreamingMethod)
    float_keys = _float_keys(plan)
    collector = method.stats_collector(plan.ctx)
    sweep = 0
    while collector is not None:
        sweep += 1
        desc = f"{method.name}: statistics pass {sweep}"
        for _, inputs in _progress(reader.stream(float_keys), len(float_keys), desc, progress):
            assert inputs is not None
            collector.observe(inputs, plan.ctx)
        if not collector.next_pass():
            plan.ctx.stats = collector.result()
            break
    backend = pipeline_backend(plan)
    if backend is not None:
        _pipeline(plan, sink, reader, progress, backend)
    else:
        _merge_pass(plan, sink, reader, progress)
    method.finish(plan.ctx)


def _merge_pass(plan: MergePlan, sink: TensorSink, reader: TensorReader, progress: bool) -> None:
    method = plan.method
    assert isinstance(method, mb.StreamingMethod)
    floats = set(_float_keys(plan))
    sliced = _fp32_compute(plan) or any_dtype(method, plan.ctx)
    rows_of = {key: chunk_rows(plan, key) if sliced else 0 for key in floats}
    stream = reader.stream(plan.keys, read=lambda key: key in floats and not rows_of[key])
    with ChunkedTensors(plan, rows_of, reader.prefetcher, reader.pool) as chunks:
        for key, inputs in _progress(stream, len(plan.keys), f"{method.name}: merging", progress):
            if key not in floats:  # integer/bool buffers pass through from the reference
                sink(key, None, plan.reference.get(key))
            elif rows_of[key]:  # elementwise method, large tensor: merged slice by slice
                chunked = chunks.take(key)
                emit_chunked(plan, sink, chunked)  # straight into the shard when the sink can
                reader.bytes_read += chunked.bytes_read
            else:
                assert inputs is not None
                result = method.merge_tensor(_to_compute(plan, key, inputs), plan.ctx)
                _emit(plan, sink, key, result.merged, result.extras)


def pipeline_backend(plan: MergePlan) -> Backend | None:
    """The overlapped pipeline's backend for CUDA and an elementwise method without side
    inputs, else None (the tests swap in a fake backend here to run the pipeline on CPU)."""
    chunkable = bool(getattr(plan.method, "chunkable", False))
    if isinstance(plan.method, mb.SliceStatsMethod):  # statistics sweeps run on the host path
        return None
    if plan.ctx.device.type != "cuda" or not chunkable or plan.side or not _fp32_compute(plan):
        return None
    from mergeops.cuda_stream import CudaBackend

    return CudaBackend(plan.ctx.device)


def _pipeline(
    plan: MergePlan, sink: TensorSink, reader: TensorReader, progress: bool, backend: Backend
) -> None:
    method = plan.method
    assert isinstance(method, mb.StreamingMethod)
    bar = tqdm(total=len(plan.keys), desc=f"{method.name}: merging", unit="tensor",
               disable=not progress, leave=False)  # fmt: skip

    def host_job(key: str) -> Callable[[], None]:
        def run() -> None:
            if not plan.metas[key].dtype.is_floating_point:
                sink(key, None, plan.reference.get(key))
            else:
                result = method.merge_tensor(reader.read(key), plan.ctx)
                _emit(plan, sink, key, result.merged, result.extras)
            bar.update()

        return run

    def finished(key: str, tensor: torch.Tensor) -> None:
        sink(key, None, tensor)  # checked finite on the device by the pipeline
        bar.update()

    pipeline = SlicePipeline(plan, backend, reader.prefetcher, host_job=host_job, sink=finished,
                             rows=row_sink(sink), written=lambda key: bar.update())  # fmt: skip
    try:
        pipeline.run()
    finally:
        bar.close()
        reader.bytes_read += pipeline.bytes_read


def _whole(plan: MergePlan, sink: TensorSink) -> None:
    method = plan.method
    assert isinstance(method, mb.WholeModelMethod)
    shaped = replace(plan, metas=output_metas(plan))  # the shapes the method declares
    inputs = mb.ModelInputs(models=plan.models, base=plan.base, side=plan.side)
    result = method.merge_model(inputs, plan.ctx)
    for key in plan.keys:
        if key not in result.merged:
            raise mb.MergeError(f"method '{method.name}' returned no tensor '{key}'")
        _emit(shaped, sink, key, result.merged[key], {})
    _emit(plan, sink, None, None, result.extras)
    method.finish(plan.ctx)


@contextmanager
def compute_threads(plan: MergePlan) -> Iterator[None]:
    """Leave one core to the reader and writer threads while a chunkable (elementwise) method
    merges on the CPU: its per-slice ops are too small for OpenMP to pay, and a team on every
    core competes with the threads that read and write. On 2 cores the merge thread then runs
    single-threaded: 270M ties (position rule) 15.1 -> 12.3 s wall, task_arithmetic 4.65 ->
    4.00 s, linear 4.22 -> 4.09 s. Elementwise results do not depend on the thread count."""
    before = torch.get_num_threads()
    elementwise_on_cpu = plan.ctx.device.type == "cpu" and getattr(plan.method, "chunkable", False)
    if not elementwise_on_cpu or before < 2:
        yield
        return
    torch.set_num_threads(before - 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(plan: MergePlan, sink: TensorSink, *, progress: bool = False) -> int:
    """Drive the method over all inputs, sending every output tensor to ``sink``.

    Returns the number of bytes read.
    """
    _load_state(plan)
    prefetcher = Prefetcher(enabled=plan.prefetch, max_bytes=plan.prefetch_bytes)
    reader = TensorReader(plan, prefetcher)
    with prefetcher, torch.no_grad(), compute_threads(plan), heap_frozen():
        if plan.routes is not None:
            return run_routed(plan, sink, prefetcher, progress, reader.pool)
        if plan.method.streaming:
            _stream(plan, sink, reader, progress)
        else:
            _whole(plan, sink)
    return reader.bytes_read


def merge_to_dicts(plan: MergePlan) -> mb.ModelResult:
    """Run a plan in memory: the merged state dict (on CPU) and extra streams."""
    result = mb.ModelResult(merged={})

    def sink(name: str, stream: str | None, tensor: torch.Tensor) -> None:
        target = result.merged if stream is None else result.extras.setdefault(stream, {})
        target[name] = tensor.detach().cpu()

    run(plan, sink)
    if plan.state_path is not None and plan.ctx.state is not None:
        staged = plan.state_path.parent / f".{plan.state_path.name}.staged"
        plan.state_path.parent.mkdir(parents=True, exist_ok=True)
        plan.method.save_state(plan.ctx.state, staged)
        swap_into_place(staged, plan.state_path)
    return result


def output_metadata(plan: MergePlan) -> dict[str, str]:
    """The safetensors ``__metadata__`` recording method, params and inputs."""
    if plan.description is not None:
        return dict(plan.description)
    inputs = [
        {"name": name, "params": params.model_dump(mode="json", by_alias=True)}
        for name, params in zip(plan.ctx.model_names, plan.ctx.model_params, strict=True)
    ]
    return {
        "mergeops_method": plan.method.name,
        "mergeops_params": json.dumps(plan.ctx.params.model_dump(mode="json", by_alias=True)),
        "mergeops_inputs": json.dumps(inputs),
        "mergeops_base": plan.base.name if plan.base is not None else "",
        "mergeops_side_inputs": json.dumps({k: [s.name for s in v] for k, v in plan.side.items()}),
        "mergeops_dtype": dtype_name(plan.ctx.out_dtype) if plan.ctx.out_dtype else "base",
        "mergeops_seed": str(plan.ctx.seed),
    }


def output_layout(plan: MergePlan) -> list[TensorSpec] | None:
    """Every merged tensor's name, shape and dtype in the order the engine emits them, so
    shards are written in place (bounded memory); a whole-model method's tensors in the
    shapes it declares (``mergeops.reshape``), every one cast to the output dtype."""
    whole = plan.routes is None and not plan.method.streaming
    metas = output_metas(plan) if whole else plan.metas

    def dtype(key: str) -> torch.dtype:
        meta = plan.metas[key]
        return _out_dtype(plan, key) if whole or meta.dtype.is_floating_point else meta.dtype

    return [TensorSpec(key, tuple(metas[key].shape), dtype(key)) for key in plan.keys]


def merge_to_dir(
    plan: MergePlan,
    out_dir: str | Path,
    *,
    max_shard_size: int | str,
    progress: bool,
    overwrite: bool = False,
    finalize: Callable[[Path], None] | None = None,
) -> MergeResult:
    """Run a plan into ``out_dir`` (sharded safetensors, extras in sub-folders), atomically.

    ``finalize(folder)`` adds files (config, tokenizer, card) before the folder is moved into
    place; ``overwrite`` replaces a non-empty ``out_dir`` only once the merge succeeded.
    """
    metadata = output_metadata(plan)
    with staged_output(out_dir, overwrite=overwrite) as staging, scratch_under(staging):
        sink = DirSink(staging, max_shard_size, metadata, output_layout(plan))
        writers = sink.writers
        try:
            bytes_read = run(plan, sink, progress=progress)
            files = writers[None].close()
            for stream, writer in writers.items():
                if stream is not None:
                    writer.close()
        except BaseException:
            for writer in writers.values():
                writer.discard()  # joins the background writes before the folder goes
            raise
        if finalize is not None:
            finalize(staging)
        staged_state = staging / ".state-staged"
        if plan.state_path is not None and plan.ctx.state is not None:
            plan.method.save_state(plan.ctx.state, staged_state)
    target = Path(out_dir)
    state_path = None
    if plan.state_path is not None and (target / ".state-staged").exists():
        state_path = swap_into_place(target / ".state-staged", plan.state_path)
    return MergeResult(
        out_dir=target,
        files=[target / f.name for f in files],
        extra_outputs={s: target / str(s) for s in writers if s is not None},
        tensor_count=writers[None].tensor_count,
        bytes_read=bytes_read,
        bytes_written=sum(w.bytes_written for w in writers.values()),
        state_path=state_path,
        method=plan.method.name,
    )
