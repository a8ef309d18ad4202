"""Run a parsed merge config into a model folder (what ``ckreg merge --config`` does)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergeops.mergekit.build import prepare
from mergeops.methods.base import MergeError

if TYPE_CHECKING:
    from mergeops.engine import MergeResult
    from mergeops.mergekit.schema import MergeConfig


def _check_out_dir(out_dir: Path, inputs: list[Path]) -> None:
    target = out_dir.resolve()
    for path in inputs:
        path = path.resolve()
        if target == path or target in path.parents:
            raise MergeError(f"output folder '{out_dir}' holds input model '{path}'; "
                             "choose another --out")  # fmt: skip


def run_merge_config(
    config: MergeConfig,
    raw: dict[str, Any],
    root: Path,
    out_dir: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Plan, merge and write ``out_dir`` (shards + config, tokenizer, card) atomically."""
    from mergeops import merge_files
    from mergeops.config import to_merge_kwargs
    from mergeops.engine import merge_to_dir

    prepared = prepare(config, raw, root, device=config.device, uniform_kwargs=to_merge_kwargs)
    try:
        folder = prepared.folder
        _check_out_dir(out_dir, prepared.inputs)
        if prepared.plan is not None:
            return merge_to_dir(
                prepared.plan, out_dir, max_shard_size=config.max_shard_size,
                progress=progress, overwrite=overwrite, finalize=folder.write,
            )  # fmt: skip
        kwargs = dict(prepared.kwargs or {})
        return merge_files(out_dir=out_dir, progress=progress, overwrite=overwrite,
                           finalize=folder.write, **kwargs)  # fmt: skip
    finally:
        if prepared.scratch is not None:
            prepared.scratch.cleanup()
