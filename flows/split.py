"""Scale-out: merge contiguous ranges of the tensor list as separate Prefect tasks.

With prefect-dask's ``DaskTaskRunner`` on the flow, the ranges run on a Dask cluster. Each task
writes its range to a part file; the parts are then written, in the original tensor order, by
the same sharded writer and metadata a single-process merge uses — so the output is
byte-identical. Only per-tensor methods split: no statistics pass, no state, no extra streams.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import safe_open

from flows.preparation import PreparedMerge
from mergeops.engine import merge_to_dicts, output_metadata
from mergeops.io.writer import (
    DEFAULT_MAX_SHARD_SIZE,
    ShardedWriter,
    staged_output,
    write_safetensors,
)
from mergeops.methods import base as mb
from mergeops.plan import MergePlan, PlanRequest, build_plan


def plan_request(prepared: PreparedMerge, device: str) -> PlanRequest:
    """The mergeops request of a prepared run (plain values only, so it pickles to workers)."""
    return PlanRequest(**prepared.input_kwargs(), device=device)


def splittable(plan: MergePlan) -> bool:
    """Whether the method merges each tensor on its own (no model-wide pass, no state)."""
    method = plan.method
    return (
        isinstance(method, mb.StreamingMethod)
        and mb.Need.STATE not in method.needs
        and method.stats_collector(plan.ctx) is None
    )


def key_ranges(keys: list[str], parts: int) -> list[list[str]]:
    """``keys`` cut into at most ``parts`` contiguous, non-empty ranges of near-equal length."""
    parts = max(1, min(parts, len(keys)))
    size, extra = divmod(len(keys), parts)
    ranges, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        ranges.append(keys[start:end])
        start = end
    return ranges


@task(cache_policy=NO_CACHE, persist_result=False, retries=1)
def merge_range(request: PlanRequest, keys: list[str], part_path: str) -> str:
    """Merge only ``keys`` into the safetensors file ``part_path``; returns the path."""
    plan = build_plan(request)
    plan.keys = list(keys)
    result = merge_to_dicts(plan)
    if result.extras:
        raise mb.MergeError(f"method '{plan.method.name}' writes extra outputs; it cannot split")
    write_safetensors(Path(part_path), {k: result.merged[k] for k in keys})
    return part_path


def split_merge(
    prepared: PreparedMerge,
    *,
    parts: int,
    device: str,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Merge ``prepared`` as ``parts`` range tasks on the flow's task runner, then assemble."""
    request = plan_request(prepared, device)
    plan = build_plan(request)
    if not splittable(plan):
        raise mb.MergeError(
            f"method '{plan.method.name}' needs whole-model passes; it cannot split"
        )
    ranges = key_ranges(plan.keys, parts)
    part_dir = prepared.work_dir / "parts"
    part_dir.mkdir(parents=True, exist_ok=True)
    futures = [
        merge_range.submit(request, keys, str(part_dir / f"part-{i:05d}.safetensors"))
        for i, keys in enumerate(ranges)
    ]
    paths = [Path(f.result()) for f in futures]
    _assemble(plan, ranges, paths, prepared.out_dir, max_shard_size)
    return {"parts": len(paths), "tensors": len(plan.keys)}


def _assemble(
    plan: MergePlan,
    ranges: list[list[str]],
    paths: list[Path],
    out_dir: Path,
    max_shard_size: int | str,
) -> None:
    """Write the parts' tensors in plan order, exactly as ``merge_to_dir`` would."""
    with staged_output(out_dir) as staging:
        writer = ShardedWriter(
            staging, max_shard_size=max_shard_size, metadata=output_metadata(plan)
        )
        for keys, path in zip(ranges, paths, strict=True):
            with safe_open(str(path), framework="pt") as part:
                for key in keys:
                    writer.add(key, part.get_tensor(key))
        writer.close()
