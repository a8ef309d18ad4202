"""Registering a merge's output: a ``merged`` checkpoint with its files, state and lineage.

A retried or restarted run reuses the pending output checkpoint of its earlier attempt, so a
run yields exactly one ready output. A failure marks that checkpoint failed (nothing ready).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from registry.models import (
    ArtifactRole,
    Checkpoint,
    CheckpointCreate,
    CheckpointKind,
    CheckpointStatus,
    LineageCreate,
    LineageRole,
    MergeRun,
)
from registry.services import completion, files, lineage
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


def output_name(run: MergeRun, policy_name: str | None) -> str:
    """``<policy>-run<id>`` for policy runs, ``<method>-run<id>`` for ad-hoc ones."""
    return f"{policy_name or run.method}-run{run.id}"


def existing_output(*, session: Session, name: str) -> Checkpoint | None:
    """The output ``name`` an earlier attempt of its run left behind (pending or ready)."""
    query = (
        select(Checkpoint)
        .where(
            Checkpoint.name == name,
            Checkpoint.kind == CheckpointKind.merged,
            col(Checkpoint.status).in_([CheckpointStatus.pending, CheckpointStatus.ready]),
        )
        .order_by(col(Checkpoint.id).desc())
    )
    return session.exec(query).first()


def start_output(*, session: Session, run: MergeRun, spec: OutputSpec) -> Checkpoint:
    """The merged checkpoint for ``run``: reused when a crashed attempt left one, else new."""
    existing = existing_output(session=session, name=spec.name)
    if existing is not None:
        return existing
    metadata: dict[str, Any] = {
        "merge_run_id": run.id,
        "method": run.method,
        "params": run.params,
        "policy_id": run.policy_id,
        "inputs": spec.input_ids,
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
    """Upload the merge's files, complete the checkpoint, store its state and lineage.

    An output a crashed attempt already completed is kept as it is (exactly one output per run).
    """
    checkpoint_id = checkpoint.id or 0
    if checkpoint.status == CheckpointStatus.ready:
        return checkpoint
    for path in sorted(p for p in out_dir.iterdir() if p.is_file() and not p.name.startswith(".")):
        files.add_file_from_path(
            session=session, store=store, checkpoint_id=checkpoint_id, path=path
        )
    lineage.add_lineage_edges(
        session=session, edges=_edges(run=run, child_id=checkpoint_id, spec=spec)
    )
    # No launcher: a merged checkpoint does not trigger on_register policies.
    ready = completion.complete_checkpoint(
        session=session, store=store, settings=settings, checkpoint_id=checkpoint_id
    )
    if spec.state_path is not None and spec.state_path.is_file():
        store_state(
            session=session,
            store=store,
            settings=settings,
            checkpoint_id=checkpoint_id,
            path=spec.state_path,
        )
    return ready


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
