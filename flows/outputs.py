"""Registering a merge's output: a ``merged`` checkpoint with its files, state and lineage.

Each attempt of a run stages its output as a pending checkpoint (tagged with the attempt's
lease) and adopts it with ``adopt_output``: the checkpoint turns ready in the same transaction
that marks the run succeeded, conditioned on still holding the lease, so a run yields exactly
one ready output however many workers tried. Staged outputs of other attempts are discarded;
a failure marks the attempt's own output failed (nothing ready).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, delete, select

from registry.models import (
    Artifact,
    ArtifactRole,
    Checkpoint,
    CheckpointCreate,
    CheckpointKind,
    CheckpointStatus,
    Lineage,
    LineageCreate,
    LineageRole,
    MergeRun,
    Metric,
)
from registry.services import completion, files, leases, lineage
from registry.services.common import release_blobs
from registry.settings import Settings
from registry.storage import ObjectStore


@dataclass(frozen=True)
class OutputSpec:
    """What the merged checkpoint is called and descends from."""

    name: str
    input_ids: list[int]
    tasks: list[str]
    state_parent_id: int | None = None
    state_path: Path | None = None
    mask_parent_ids: tuple[int, ...] = ()
    # (file name, local path) copied next to the merged weights (HF config.json & co.);
    # ``adapter``: the output is a PEFT adapter (weights renamed adapter_model.safetensors)
    extras: tuple[tuple[str, Path], ...] = ()
    adapter: bool = False


def output_name(run: MergeRun, policy_name: str | None) -> str:
    """``<policy>-run<id>`` for policy runs, ``<method>-run<id>`` for ad-hoc ones."""
    return f"{policy_name or run.method}-run{run.id}"


def staged_outputs(*, session: Session, run: MergeRun, name: str) -> list[Checkpoint]:
    """The pending outputs attempts of ``run`` staged (named ``name``), oldest first."""
    query = (
        select(Checkpoint)
        .where(
            Checkpoint.name == name,
            Checkpoint.kind == CheckpointKind.merged,
            Checkpoint.status == CheckpointStatus.pending,
        )
        .order_by(col(Checkpoint.id))
    )
    return [c for c in session.exec(query).all() if c.meta.get("merge_run_id") == run.id]


def _staged_by(checkpoint: Checkpoint, lease: leases.Lease) -> bool:
    meta = checkpoint.meta
    return meta.get("attempt") == lease.attempt and meta.get("lease_owner") == lease.owner


def start_output(
    *, session: Session, store: ObjectStore, run: MergeRun, spec: OutputSpec, lease: leases.Lease
) -> Checkpoint:
    """The pending output this attempt stages: reused on a retry, else new.

    Outputs other attempts staged are discarded (their workers lost the lease to this one).
    """
    mine = None
    for staged in staged_outputs(session=session, run=run, name=spec.name):
        if _staged_by(staged, lease):
            mine = staged
        else:
            discard_output(session=session, store=store, checkpoint_id=staged.id or 0)
    if mine is not None:
        return mine
    metadata: dict[str, Any] = {
        "merge_run_id": run.id,
        "method": run.method,
        "params": run.params,
        "policy_id": run.policy_id,
        "inputs": spec.input_ids,
        "attempt": lease.attempt,
        "lease_owner": lease.owner,
    }
    data = CheckpointCreate(
        name=spec.name,
        kind=CheckpointKind.merged,
        base_id=run.base_id,
        task="+".join(sorted(set(spec.tasks))) or None,
        tags=["merged", f"method:{run.method}"],
        metadata=metadata,
    )
    from registry.services.checkpoints import create_checkpoint

    return create_checkpoint(session=session, data=data)


def upload_output(
    *,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    run: MergeRun,
    checkpoint: Checkpoint,
    out_dir: Path,
    spec: OutputSpec,
) -> Checkpoint:
    """Upload the merge's files, state and lineage into the pending ``checkpoint``.

    It stays pending (invisible to policies and listings of ready checkpoints) until
    ``adopt_output`` publishes it.
    """
    checkpoint_id = checkpoint.id or 0
    add_extras(out_dir, spec)
    for path in sorted(p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        files.add_file_from_path(
            session=session, store=store, checkpoint_id=checkpoint_id, path=path
        )
    lineage.add_lineage_edges(
        session=session, edges=_edges(run=run, child_id=checkpoint_id, spec=spec)
    )
    learnt = learnt_coefficients(out_dir, spec)
    if learnt:
        checkpoint.meta = {**checkpoint.meta, "learnt_coefficients": learnt}
        session.add(checkpoint)
        session.commit()
    if spec.state_path is not None and spec.state_path.is_file():
        store_state(
            session=session,
            store=store,
            settings=settings,
            checkpoint_id=checkpoint_id,
            path=spec.state_path,
        )
    session.refresh(checkpoint)
    return checkpoint


def adopt_output(
    *,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    lease: leases.Lease,
    checkpoint_id: int,
) -> Checkpoint:
    """Publish the staged output: validate it, mark it ready and the run succeeded, atomically.

    The run's conditional update (``finish_under_lease``) runs first in the transaction that
    ``complete_checkpoint`` commits when it marks the checkpoint ready; a lost lease raises
    ``LeaseLost`` and a failed validation rolls both back. No launcher: a merged checkpoint
    does not trigger on_register policies.
    """
    leases.finish_under_lease(session=session, lease=lease, output_checkpoint_id=checkpoint_id)
    ready = completion.complete_checkpoint(
        session=session, store=store, settings=settings, checkpoint_id=checkpoint_id
    )
    session.commit()
    return ready


def learnt_coefficients(out_dir: Path, spec: OutputSpec) -> dict[str, Any] | None:
    """The merging coefficients a method learnt (adamerging's ``coefficients`` stream), as
    ``{"lambda": per input [λ] (task-wise) or [[λ per tensor]], "tensors": [...], "loss": the
    objective per learning step}``, rounded
    to 6 digits; None when the merge learnt none."""
    import json

    from mergeops.io import ShardedCheckpoint

    folder = out_dir / "coefficients"
    if not (folder / "model.safetensors.index.json").is_file():
        return None
    stream = ShardedCheckpoint(folder)
    lambdas = stream.get("lambda").tolist()
    tensors = json.loads(bytes(stream.get("lambda.keys").tolist()).decode())
    rounded = [round(v, 6) if isinstance(v, float) else [round(x, 6) for x in v] for v in lambdas]
    losses = stream.get("loss").tolist() if "loss" in stream.keys() else []  # noqa: SIM118
    return {"inputs": list(spec.input_ids), "lambda": rounded, "tensors": tensors,
            "loss": [round(v, 6) for v in losses]}  # fmt: skip


def add_extras(out_dir: Path, spec: OutputSpec) -> None:
    """Copy the pass-through files into ``out_dir`` (never over a file the merge wrote); an
    adapter output's single weights file becomes ``adapter_model.safetensors`` (and its index
    goes), as PEFT loads it. A copied ``config.json`` gets the output's dtype and widths (a
    wider pleas merge: ``intermediate_size``)."""
    copied = set()
    for name, source in spec.extras:
        if not (out_dir / name).exists():
            shutil.copyfile(source, out_dir / name)
            copied.add(name)
    if "config.json" in copied and not spec.adapter:
        from flows.pass_through import set_config_dtype
        from mergeops.io.model_folder import update_config_widths

        set_config_dtype(out_dir)
        update_config_widths(out_dir)
    if not spec.adapter:
        return
    shards = sorted(out_dir.glob("model-*-of-*.safetensors"))
    if len(shards) == 1:
        shards[0].rename(out_dir / "adapter_model.safetensors")
        (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)


def _edges(*, run: MergeRun, child_id: int, spec: OutputSpec) -> list[LineageCreate]:
    edges = [
        LineageCreate(parent_id=i, child_id=child_id, role=LineageRole.input, merge_run_id=run.id)
        for i in spec.input_ids
    ]
    if run.base_id is not None:
        edges.append(
            LineageCreate(
                parent_id=run.base_id, child_id=child_id, role=LineageRole.base, merge_run_id=run.id
            )
        )
    if spec.state_parent_id is not None:
        edges.append(
            LineageCreate(
                parent_id=spec.state_parent_id,
                child_id=child_id,
                role=LineageRole.state,
                merge_run_id=run.id,
            )
        )
    edges.extend(
        LineageCreate(parent_id=m, child_id=child_id, role=LineageRole.mask, merge_run_id=run.id)
        for m in spec.mask_parent_ids
    )
    return edges


def store_state(
    *, session: Session, store: ObjectStore, settings: Settings, checkpoint_id: int, path: Path
) -> None:
    """Attach the continual merge's state file as the checkpoint's ``merge_state`` artifact."""
    from registry.services import artifacts

    artifacts.add_artifact(
        session=session,
        store=store,
        settings=settings,
        checkpoint_id=checkpoint_id,
        role=ArtifactRole.merge_state,
        content=path,
        name="merge_state.safetensors",
    )


def discard_output(*, session: Session, store: ObjectStore, checkpoint_id: int) -> None:
    """Drop an output an attempt that lost its lease staged: its rows go, the checkpoint is
    marked deleted and its blobs are released to garbage collection."""
    session.rollback()
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None or checkpoint.status != CheckpointStatus.pending:
        return
    keys = list(
        session.exec(select(Artifact.blob_key).where(Artifact.checkpoint_id == checkpoint_id))
    )
    session.execute(delete(Artifact).where(col(Artifact.checkpoint_id) == checkpoint_id))
    session.execute(delete(Metric).where(col(Metric.checkpoint_id) == checkpoint_id))
    session.execute(delete(Lineage).where(col(Lineage.child_id) == checkpoint_id))
    checkpoint.status = CheckpointStatus.deleted
    checkpoint.total_bytes = 0
    checkpoint.meta = {**checkpoint.meta, "discarded": "its attempt lost the run's lease"}
    session.add(checkpoint)
    session.commit()
    release_blobs(session=session, store=store, keys=keys)


def fail_output(
    *, session: Session, store: ObjectStore, checkpoint_id: int | None, error: str
) -> None:
    """Mark the output of a failed run failed, so nothing ready remains of a dead attempt."""
    if checkpoint_id is None:
        return
    session.rollback()
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is not None and checkpoint.status in (
        CheckpointStatus.pending,
        CheckpointStatus.ready,
    ):
        completion.fail_checkpoint(
            session=session, store=store, checkpoint_id=checkpoint_id, error=error
        )
