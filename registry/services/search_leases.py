"""The worker side of merge searches: claim a search under an expiring lease, renew it, save
progress after every candidate (only while holding it), and finish it.

Every claim bumps ``attempts``, and the claim's ``UPDATE`` is conditioned on the attempts it
read, so of two workers claiming one search exactly one wins. A running search whose owner
process died (same host) or whose lease expired is stale: the next claim or start takes it over.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from registry.errors import InvalidState, NotFound
from registry.models import utcnow
from registry.search_models import ACTIVE, MergeSearch, SearchStatus
from registry.services.leases import _aware, owner_is_dead


class SearchLeaseLost(InvalidState):
    """The worker no longer holds the search (another worker took it over)."""


def is_stale(row: MergeSearch) -> bool:
    """A running search whose worker died: its owner process is gone or its lease expired."""
    if row.status != SearchStatus.running:
        return False
    expires = _aware(row.lease_expires_at)
    return owner_is_dead(row.lease_owner) or expires is None or expires < utcnow()


def _get(session: Session, search_id: int) -> MergeSearch:
    row = session.get(MergeSearch, search_id)
    if row is None:
        raise NotFound(f"merge search {search_id} not found")
    return row


def claim_search(*, session: Session, search_id: int, owner: str, lease_s: float) -> bool:
    """Take a queued search (or a running one whose worker died) for ``owner``; False when
    it is not claimable (finished, cancelled, or held by a live worker)."""
    row = _get(session, search_id)
    if row.status != SearchStatus.queued and not is_stale(row):
        return False
    now = utcnow()
    result = session.execute(
        update(MergeSearch)
        .where(
            col(MergeSearch.id) == search_id,
            col(MergeSearch.attempts) == row.attempts,
            col(MergeSearch.status).in_(ACTIVE),
        )
        .values(
            status=SearchStatus.running,
            lease_owner=owner,
            attempts=row.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
            started_at=row.started_at or now,
        )
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def save_progress(
    *, session: Session, search_id: int, owner: str, lease_s: float, progress: dict[str, Any]
) -> bool:
    """Store the search's progress and renew the lease (one commit); True when a cancel was
    asked for. ``SearchLeaseLost`` when another worker took the search over."""
    history = progress.get("history", [])
    best = max((h["score"] for h in history), default=None)
    now = utcnow()
    result = session.execute(
        update(MergeSearch)
        .where(
            col(MergeSearch.id) == search_id,
            col(MergeSearch.lease_owner) == owner,
            col(MergeSearch.status) == SearchStatus.running,
        )
        .values(
            state=progress,
            evaluations=progress.get("evaluations", 0),
            best_score=best,
            elapsed_s=progress.get("elapsed_s", 0.0),
            updated_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
        )
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise SearchLeaseLost(f"search {search_id}: this worker no longer holds it")
    session.expire_all()
    return _get(session, search_id).cancel_requested


def finish_search(
    *,
    session: Session,
    search_id: int,
    owner: str,
    status: SearchStatus,
    checkpoint_id: int | None = None,
    error: str | None = None,
) -> None:
    """End the search (finished, cancelled or failed) and free the policy for the next one."""
    now = utcnow()
    session.execute(
        update(MergeSearch)
        .where(col(MergeSearch.id) == search_id, col(MergeSearch.lease_owner) == owner)
        .values(
            status=status,
            checkpoint_id=checkpoint_id,
            error=error,
            active_policy_id=None,
            lease_owner=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
    )
    session.commit()


def renew_lease(*, session: Session, search_id: int, owner: str, lease_s: float) -> bool:
    """Extend ``owner``'s lease on a running search; False when it holds it no more."""
    result = session.execute(
        update(MergeSearch)
        .where(
            col(MergeSearch.id) == search_id,
            col(MergeSearch.lease_owner) == owner,
            col(MergeSearch.status) == SearchStatus.running,
        )
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
    )
    session.commit()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def unclaimed(row: MergeSearch, claim_grace_s: float) -> bool:
    """A queued search nobody claimed within the grace (its launch was lost with a process)."""
    if row.status != SearchStatus.queued:
        return False
    updated = _aware(row.updated_at)
    return updated is not None and (utcnow() - updated).total_seconds() >= claim_grace_s


def reclaim_stale_searches(*, session: Session, claim_grace_s: float) -> list[int]:
    """Searches to launch again: running ones whose worker died, queued ones nobody claimed
    within ``claim_grace_s``. Each is queued again (lease cleared, state kept) by exactly one
    of many sweepers; returns their ids."""
    rows = session.exec(select(MergeSearch).where(col(MergeSearch.status).in_(ACTIVE))).all()
    found = []
    for row in rows:
        if not is_stale(row) and not unclaimed(row, claim_grace_s):
            continue
        result = session.execute(
            update(MergeSearch)
            .where(
                col(MergeSearch.id) == row.id,
                col(MergeSearch.attempts) == row.attempts,
                col(MergeSearch.status) == row.status,
                col(MergeSearch.updated_at) == row.updated_at,
            )
            .values(
                status=SearchStatus.queued,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=utcnow(),
            )
        )
        session.commit()
        if result.rowcount == 1:  # type: ignore[attr-defined]
            found.append(row.id or 0)
    return found
