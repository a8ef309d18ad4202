"""Prefect flows for mixture-of-experts checkpoints, run against the registry's database and store.

- ``moe_build(spec, name)``: a dense base checkpoint plus expert fine-tune checkpoints (ids) -> an
  MoE (``mergeops.moe.build``), registered as a ``merged`` checkpoint whose metadata names
  ``moe_experts`` and ``moe_base``, so completion links every expert (role ``input``) and the
  base (role ``base``) as lineage parents.
- ``moe_compress(source_id, num_experts, calibration, ...)``: an MoE checkpoint -> fewer experts
  per layer (``mergeops.moe.compress``: mc_smoe, sub_moe, average), registered as a ``merged``
  child (``moe_compressed_from``, lineage ``input``) with metrics: experts before/after, bytes
  saved, and the mean next-token NLL on the calibration inputs before and after.

Inputs are resolved like merge inputs (``flows.inputs.checkpoint_dir``: links into the store or
the shared download cache) and each run works in its own folder under ``<work>/moe/``, removed
afterwards. Metrics are stored before the checkpoint completes, so a ready output has them; a
failure marks the half-made output failed (nothing ready). Parameters are JSON (ids, token ids),
so a Prefect deployment can start them.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.inputs import checkpoint_dir
from flows.merge_flow import in_background, track_checkpoint
from flows.retries import IO_TASK
from flows.runtime import current_runtime
from registry.models import CheckpointCreate, CheckpointKind, MetricCreate, MetricSource
from registry.services import completion, files, metrics
from registry.services.checkpoints import create_checkpoint

log = logging.getLogger(__name__)

BUILD_SETTINGS = (
    "gate_mode",
    "experts_per_token",
    "shared_weights",
    "seed",
    "architecture",
    "shared_expert",
    "shared_expert_weight",
)
EXPERT_KEYS = (
    "checkpoint_id",
    "positive_token_ids",
    "negative_token_ids",
    "positive_prompts",
    "negative_prompts",
)


def _work() -> Path:
    settings = current_runtime().settings
    return settings.work_dir or settings.home / "work"


def check_build_spec(spec: dict[str, Any]) -> tuple[int, list[int]]:
    """(base id, expert ids) of a build spec; ``ValueError`` naming the key that is wrong."""
    from mergeops.moe.experts import MoeError

    unknown = set(spec) - {"base_checkpoint_id", "experts", *BUILD_SETTINGS}
    if unknown:
        raise MoeError(f"unknown key(s) in the MoE build spec: {', '.join(sorted(unknown))}")
    base, experts = spec.get("base_checkpoint_id"), spec.get("experts")
    if not isinstance(base, int) or not isinstance(experts, list) or len(experts) < 2:
        raise MoeError(
            "the MoE build spec needs 'base_checkpoint_id' (an id) and 'experts' (2 or more)"
        )
    ids = []
    for index, entry in enumerate(experts):
        bad = set(entry) - set(EXPERT_KEYS) if isinstance(entry, dict) else {"(not a mapping)"}
        if bad or not isinstance(entry.get("checkpoint_id"), int):
            raise MoeError(
                f"expert {index} of the MoE build spec needs an int 'checkpoint_id' and only "
                f"{', '.join(EXPERT_KEYS)}; got {entry!r}"
            )
        ids.append(int(entry["checkpoint_id"]))
    return base, ids


@task(**IO_TASK)
def fetch_checkpoints(ids: list[int]) -> dict[int, Path]:
    """A local folder of each ready checkpoint's files (I/O: retried)."""
    runtime = current_runtime()
    cache = _work() / "cache"
    with runtime.session() as session:
        return {
            i: checkpoint_dir(
                session=session, store=runtime.store, checkpoint_id=i, cache_dir=cache
            )
            for i in ids
        }


def _token_rows(entry: dict[str, Any], sign: str, base: Path, tokenizer: dict[str, Any]) -> list:
    import torch

    rows = [torch.tensor(r, dtype=torch.long) for r in entry.get(f"{sign}_token_ids") or []]
    texts = entry.get(f"{sign}_prompts") or []
    if texts and "t" not in tokenizer:
        from transformers import AutoTokenizer

        tokenizer["t"] = AutoTokenizer.from_pretrained(base)
    return rows + [tokenizer["t"](text, return_tensors="pt").input_ids for text in texts]


@task(cache_policy=NO_CACHE, persist_result=False)
def build_task(spec: dict[str, Any], folders: dict[int, Path], out: Path) -> dict[str, Any]:
    """Run ``build_moe`` into ``out``; returns its size and expert count."""
    from mergeops.moe.build import BuildParams, ExpertSource, build_moe

    base = folders[spec["base_checkpoint_id"]]
    tokenizer: dict[str, Any] = {}
    experts = [
        ExpertSource(
            folders[e["checkpoint_id"]],
            _token_rows(e, "positive", base, tokenizer),
            _token_rows(e, "negative", base, tokenizer),
        )
        for e in spec["experts"]
    ]
    params = BuildParams(**{k: spec[k] for k in BUILD_SETTINGS if k in spec})
    result = build_moe(base, experts, out, params)
    return {"num_experts": result.num_experts, "bytes": result.bytes_written}


@task(cache_policy=NO_CACHE, persist_result=False)
def compress_task(
    source: Path,
    out: Path,
    method: str,
    num_experts: int,
    calibration: list[list[int]],
    options: dict,
) -> dict[str, float]:
    """Run ``compress_moe`` into ``out``; returns the metrics the output is registered with."""
    import torch
    from transformers import AutoModelForCausalLM

    from mergeops.moe.compress import compress_moe
    from mergeops.moe.stats import calibration_nll

    rows = [torch.tensor(r, dtype=torch.long) for r in calibration]
    result = compress_moe(source, out, method, num_experts, rows, progress=False, **options)  # type: ignore[arg-type]
    before = calibration_nll(AutoModelForCausalLM.from_pretrained(source).eval(), rows)
    scored = out
    if options.get("factored"):  # ckreg's own layout: scored in its materialized form
        from mergeops.moe.factored import materialize

        scored = materialize(out, out.parent / "materialized")
    after = calibration_nll(AutoModelForCausalLM.from_pretrained(scored).eval(), rows)
    saved = result.bytes_before - result.bytes_after
    return {
        "moe/experts_before": float(result.experts_before),
        "moe/experts_after": float(result.experts_after),
        "moe/bytes_saved": float(saved),
        "moe/bytes_saved_fraction": saved / result.bytes_before if result.bytes_before else 0.0,
        "moe/calibration_nll_before": before,
        "moe/calibration_nll_after": after,
    }


@task(**IO_TASK)
def register_output(
    folder: Path, name: str, metadata: dict[str, Any], values: dict[str, float]
) -> int:
    """Upload ``folder`` as a ``merged`` checkpoint with ``values`` as metrics, then complete
    it (which checks and links the MoE lineage ids in ``metadata``); failed on any error."""
    runtime = current_runtime()
    with runtime.session() as session:
        data = CheckpointCreate(
            name=name, kind=CheckpointKind.merged, tags=["merged", "moe"], metadata=metadata
        )
        checkpoint = create_checkpoint(session=session, data=data)
        checkpoint_id = checkpoint.id or 0
        try:
            for path in sorted(p for p in folder.iterdir() if p.is_file()):
                files.add_file_from_path(
                    session=session, store=runtime.store, checkpoint_id=checkpoint_id, path=path
                )
            rows = [
                MetricCreate(name=k, value=v, source=MetricSource.evaluation)
                for k, v in values.items()
            ]
            metrics.add_metrics(session=session, checkpoint_id=checkpoint_id, metrics=rows)
            completion.complete_checkpoint(
                session=session,
                store=runtime.store,
                settings=runtime.settings,
                checkpoint_id=checkpoint_id,
            )
        except Exception as exc:
            completion.fail_checkpoint(
                session=session, store=runtime.store, checkpoint_id=checkpoint_id, error=str(exc)
            )
            raise
    in_background(track_checkpoint, checkpoint_id)
    return checkpoint_id


@flow(name="moe_build", persist_result=False, log_prints=True)
def moe_build(spec: dict[str, Any], name: str) -> int:
    """Build an MoE from registry checkpoints (``spec``: ``base_checkpoint_id``, ``experts``:
    ``[{checkpoint_id, positive_token_ids | positive_prompts, negative_...}]`` and the
    ``BuildParams`` keys); returns the registered MoE's id."""
    base_id, expert_ids = check_build_spec(spec)
    work = _work() / "moe" / f"build-{uuid.uuid4().hex[:12]}"
    try:
        folders = fetch_checkpoints(sorted({base_id, *expert_ids}))
        built = build_task(spec, folders, work / "out")
        metadata = {"moe_experts": expert_ids, "moe_base": base_id, "built_by": "moe_build flow"}
        values = {"moe/experts": float(built["num_experts"]), "moe/bytes": float(built["bytes"])}
        return register_output(work / "out", name, metadata, values)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@flow(name="moe_compress", persist_result=False, log_prints=True)
def moe_compress(
    source_id: int,
    num_experts: int,
    calibration: list[list[int]],
    method: str = "mc_smoe",
    name: str | None = None,
    options: dict[str, Any] | None = None,
) -> int:
    """Merge the experts of MoE checkpoint ``source_id`` down to ``num_experts`` per layer
    (``calibration``: token-id lists; ``options``: align, rank, low_rank, sparse_fraction);
    returns the registered child's id."""
    work = _work() / "moe" / f"compress-{uuid.uuid4().hex[:12]}"
    try:
        source = fetch_checkpoints([source_id])[source_id]
        values = compress_task(
            source, work / "out", method, num_experts, calibration, dict(options or {})
        )
        metadata = {
            "moe_compressed_from": source_id,
            "method": method,
            "params": {"num_experts": num_experts, **(options or {})},
            "built_by": "moe_compress flow",
        }
        label = name or f"moe{source_id}-{method}-{num_experts}"
        return register_output(work / "out", label, metadata, values)
    finally:
        shutil.rmtree(work, ignore_errors=True)
