"""Merge-run state transitions: queued -> running -> succeeded | failed, as the merge flow reports.

Creation (with its idempotency key) and queries live in ``registry.services.merge_runs``.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlmodel import Session, col

from registry.models import MergeRun, MergeRunStatus, utcnow
from registry.services.merge_runs import get_merge_run


def claim_merge_run(
    *, session: Session, run_id: int, orchestration_run_id: str | None = None
) -> MergeRun | None:
    """Atomically move a run to running; ``None`` when it already succeeded.

    Queued, failed and (crashed) running runs can be claimed, so a re-run after a crash works.
    """
    result = session.execute(
        update(MergeRun)
        .where(
            col(MergeRun.id) == run_id,
            col(MergeRun.status) != MergeRunStatus.succeeded,
        )
        .values(
            status=MergeRunStatus.running,
            started_at=utcnow(),
            orchestration_run_id=orchestration_run_id,
            error=None,
        )
    )
    session.commit()
    if getattr(result, "rowcount", 0) == 0:
        get_merge_run(session=session, run_id=run_id)  # NotFound when absent
        return None
    run = get_merge_run(session=session, run_id=run_id)
    session.refresh(run)
    return run


def finish_merge_run(
    *,
    session: Session,
    run_id: int,
    output_checkpoint_id: int,
    mlflow_run_id: str | None = None,
) -> MergeRun:
    """Mark a run succeeded with its output checkpoint; returns the run."""
    run = get_merge_run(session=session, run_id=run_id)
    run.status = MergeRunStatus.succeeded
    run.output_checkpoint_id = output_checkpoint_id
    run.finished_at = utcnow()
    run.error = None
    if mlflow_run_id is not None:
        run.mlflow_run_id = mlflow_run_id
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def set_mlflow_run_id(*, session: Session, run_id: int, mlflow_run_id: str) -> None:
    """Record the MLflow run that logged this merge."""
    run = get_merge_run(session=session, run_id=run_id)
    run.mlflow_run_id = mlflow_run_id
    session.add(run)
    session.commit()


def fail_merge_run(*, session: Session, run_id: int, error: str) -> MergeRun:
    """Mark a run failed, keeping the error message; returns the run."""
    session.rollback()
    run = get_merge_run(session=session, run_id=run_id)
    run.status = MergeRunStatus.failed
    run.error = error[:4000]
    run.finished_at = utcnow()
    session.add(run)
    session.commit()
    session.refresh(run)
    return run
