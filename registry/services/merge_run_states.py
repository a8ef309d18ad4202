"""Merge-run bookkeeping outside the lease: the MLflow run id, and failing a run by hand.

The queued -> running -> succeeded | failed transitions of a worker go through its lease
(``registry.services.leases``); creation and queries live in ``registry.services.merge_runs``.
"""

from __future__ import annotations

from sqlmodel import Session

from registry.models import MergeRun, MergeRunStatus, utcnow
from registry.services.merge_runs import get_merge_run


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
