"""Merge-run leases: the one worker executing a run holds an expiring claim on it.

A worker claims a run (PostgreSQL locks the row with ``SELECT ... FOR UPDATE SKIP LOCKED``;
SQLite, where a write locks the database, relies on the conditional ``UPDATE`` alone), renews
the lease while it works, and publishes the run's output only in a transaction conditioned on
still holding it (``finish_under_lease``). Every claim bumps ``attempts``, so a claim is also a
version: a worker whose lease was taken over cannot renew, finish or fail the run any more.
The recovery sweep (``reclaim_stale_runs``) hands back runs whose worker stopped renewing.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlmodel import Session, col

from registry.errors import InvalidState
from registry.models import MergeRun, MergeRunStatus, utcnow
from registry.services.merge_runs import get_merge_run

#: Statuses a worker may claim: failed runs too, so running the flow again retries them.
CLAIMABLE = (MergeRunStatus.queued, MergeRunStatus.running, MergeRunStatus.failed)
UNFINISHED = (MergeRunStatus.queued, MergeRunStatus.running)


class LeaseLost(InvalidState):
    """The worker no longer holds the run's lease (it expired and another worker took over)."""


@dataclass(frozen=True)
class Lease:
    """A worker's claim on one merge run: ``attempt`` is the run's ``attempts`` it set."""

    run_id: int
    owner: str
    attempt: int
    expires_at: datetime


def new_owner() -> str:
    """A lease owner name for this process: ``<host>:<pid>:<random>``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` names a process on this host that no longer runs.

    Its lease can be broken at once instead of after expiry (a restarted embedded server, a
    killed worker on the same machine). Owners on other hosts are judged by expiry only.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process whose parent has not reaped it yet is a zombie: dead too
        with open(f"/proc/{pid_text}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone; they are stored in UTC.
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _is_free(owner: str | None, expires_at: datetime | None, now: datetime) -> bool:
    expires = _aware(expires_at)
    return owner is None or expires is None or expires < now or owner_is_dead(owner)


def _free_condition(now: datetime, dead_owner: str | None) -> ColumnElement[bool]:
    """SQL for "nobody holds the lease": no owner, no or a past expiry, or a dead local owner."""
    clauses = [
        col(MergeRun.lease_owner).is_(None),
        col(MergeRun.lease_expires_at).is_(None),
        col(MergeRun.lease_expires_at) < now,
    ]
    if dead_owner is not None:
        clauses.append(col(MergeRun.lease_owner) == dead_owner)
    return or_(*clauses)


def _lease_row(session: Session, run_id: int) -> Any:
    """The run's lease columns, row-locked on PostgreSQL; None when another claimer holds the
    lock (SKIP LOCKED) or the run does not exist. SQLite ignores FOR UPDATE."""
    query = (
        select(
            col(MergeRun.status),
            col(MergeRun.attempts),
            col(MergeRun.lease_owner),
            col(MergeRun.lease_expires_at),
            col(MergeRun.created_at),
        )
        .where(col(MergeRun.id) == run_id)
        .with_for_update(skip_locked=True)
    )
    return session.execute(query).first()


def claim_merge_run(
    *,
    session: Session,
    run_id: int,
    owner: str,
    lease_s: float,
    orchestration_run_id: str | None = None,
) -> Lease | None:
    """Claim run ``run_id`` for ``owner`` for ``lease_s`` seconds and move it to running.

    Returns the lease, or None when the run succeeded already or another live worker holds it
    (``NotFound`` when there is no such run). Exactly one of concurrent claimers wins.
    """
    now = utcnow()
    row = _lease_row(session, run_id)
    if row is None:
        session.rollback()
        get_merge_run(session=session, run_id=run_id)  # NotFound when absent
        return None
    if row.status not in CLAIMABLE or not _is_free(row.lease_owner, row.lease_expires_at, now):
        session.rollback()
        return None
    dead = row.lease_owner if owner_is_dead(row.lease_owner) else None
    expires = now + timedelta(seconds=lease_s)
    result = session.execute(
        update(MergeRun)
        .where(
            col(MergeRun.id) == run_id,
            col(MergeRun.attempts) == row.attempts,
            col(MergeRun.status).in_(CLAIMABLE),
            _free_condition(now, dead),
        )
        .values(
            status=MergeRunStatus.running,
            lease_owner=owner,
            lease_expires_at=expires,
            heartbeat_at=now,
            attempts=row.attempts + 1,
            started_at=now,
            orchestration_run_id=orchestration_run_id,
            error=None,
        )
    )
    session.commit()
    if getattr(result, "rowcount", 0) != 1:
        return None
    return Lease(run_id=run_id, owner=owner, attempt=row.attempts + 1, expires_at=expires)


def _held(lease: Lease) -> list[ColumnElement[bool]]:
    """SQL for "``lease`` is still the run's current claim"."""
    return [
        col(MergeRun.id) == lease.run_id,
        col(MergeRun.lease_owner) == lease.owner,
        col(MergeRun.attempts) == lease.attempt,
        col(MergeRun.status) == MergeRunStatus.running,
    ]


def renew_lease(*, session: Session, lease: Lease, lease_s: float) -> Lease | None:
    """Extend the lease by ``lease_s`` from now (the heartbeat); None when it was lost."""
    now = utcnow()
    expires = now + timedelta(seconds=lease_s)
    result = session.execute(
        update(MergeRun).where(*_held(lease)).values(lease_expires_at=expires, heartbeat_at=now)
    )
    session.commit()
    if getattr(result, "rowcount", 0) != 1:
        return None
    return Lease(run_id=lease.run_id, owner=lease.owner, attempt=lease.attempt, expires_at=expires)


def holds_lease(*, session: Session, lease: Lease) -> bool:
    """Whether ``lease`` is still the run's current claim (expired but not taken over counts)."""
    found = session.execute(select(col(MergeRun.id)).where(*_held(lease))).first()
    session.rollback()
    return found is not None


def finish_under_lease(*, session: Session, lease: Lease, output_checkpoint_id: int) -> None:
    """Mark the run succeeded with its output, in the session's open transaction.

    Does not commit: the caller commits it together with the output's own changes, so the
    output is adopted if and only if the lease was still held. Raises ``LeaseLost`` (after a
    rollback) otherwise.
    """
    result = session.execute(
        update(MergeRun)
        .where(*_held(lease))
        .values(
            status=MergeRunStatus.succeeded,
            output_checkpoint_id=output_checkpoint_id,
            finished_at=utcnow(),
            lease_expires_at=None,
            error=None,
        )
    )
    if getattr(result, "rowcount", 0) != 1:
        session.rollback()
        raise LeaseLost(
            f"merge run {lease.run_id}: lease of '{lease.owner}' (attempt {lease.attempt}) "
            "was lost; its output is not adopted"
        )


def fail_under_lease(*, session: Session, lease: Lease, error: str) -> bool:
    """Mark the run failed with ``error`` if ``lease`` still holds it; returns whether it did."""
    session.rollback()
    result = session.execute(
        update(MergeRun)
        .where(*_held(lease))
        .values(
            status=MergeRunStatus.failed,
            error=error[:4000],
            finished_at=utcnow(),
            lease_expires_at=None,
        )
    )
    session.commit()
    return getattr(result, "rowcount", 0) == 1


def _stale(row: Any, now: datetime, claim_grace_s: float) -> bool:
    """A queued/running run nobody works on: lease expired, owner dead, or never claimed in
    ``claim_grace_s`` seconds."""
    expires = _aware(row.lease_expires_at)
    if expires is not None:
        return expires <= now or owner_is_dead(row.lease_owner)
    if row.lease_owner is not None and owner_is_dead(row.lease_owner):
        return True
    created = _aware(row.created_at)
    return created is None or created < now - timedelta(seconds=claim_grace_s)


def reclaim_stale_runs(*, session: Session, claim_grace_s: float) -> list[int]:
    """Re-queue unfinished runs nobody works on; returns the ids the caller must re-submit.

    Each stale run is re-queued with a compare-and-set on its lease, so of many sweeping
    workers exactly one gets each run. The run then waits ``claim_grace_s`` for a claim before
    it counts as stale again.
    """
    now = utcnow()
    rows = session.execute(
        select(
            col(MergeRun.id),
            col(MergeRun.attempts),
            col(MergeRun.lease_owner),
            col(MergeRun.lease_expires_at),
            col(MergeRun.created_at),
        )
        .where(col(MergeRun.status).in_(UNFINISHED))
        .order_by(col(MergeRun.id))
    ).all()
    session.rollback()
    won: list[int] = []
    for row in rows:
        if _stale(row, now, claim_grace_s) and _requeue(session, row, now, claim_grace_s):
            won.append(row.id)
    return won


def _requeue(session: Session, row: Any, now: datetime, claim_grace_s: float) -> bool:
    dead = row.lease_owner if owner_is_dead(row.lease_owner) else None
    never_claimed = and_(
        col(MergeRun.lease_expires_at).is_(None),
        col(MergeRun.created_at) < now - timedelta(seconds=claim_grace_s),
    )
    still_stale = [col(MergeRun.lease_expires_at) < now, never_claimed]
    if dead is not None:
        still_stale.append(col(MergeRun.lease_owner) == dead)
    result = session.execute(
        update(MergeRun)
        .where(
            col(MergeRun.id) == row.id,
            col(MergeRun.attempts) == row.attempts,
            col(MergeRun.lease_owner).is_not_distinct_from(row.lease_owner),
            col(MergeRun.status).in_(UNFINISHED),
            or_(*still_stale),
        )
        .values(
            status=MergeRunStatus.queued,
            lease_owner=None,
            lease_expires_at=now + timedelta(seconds=claim_grace_s),
        )
    )
    session.commit()
    return getattr(result, "rowcount", 0) == 1


def release_lease(*, session: Session, lease: Lease, reason: str) -> bool:
    """Give an interrupted attempt's run back: queued, no owner, lease expired now.

    For an attempt that was lost, not one that failed (its worker was killed or stopped, its
    output pipe broke): the next recovery sweep re-submits the run at once instead of after the
    lease. Returns whether ``lease`` still held the run (a successor's claim is left alone).
    """
    session.rollback()
    now = utcnow()
    result = session.execute(
        update(MergeRun)
        .where(*_held(lease))
        .values(
            status=MergeRunStatus.queued,
            lease_owner=None,
            lease_expires_at=now,
            error=f"attempt {lease.attempt} lost: {reason}"[:4000],
        )
    )
    session.commit()
    return getattr(result, "rowcount", 0) == 1
