"""Merge searches as rows (``mergesearch``): start one per policy at a time, watch, cancel, and
the worker side (claim under a lease, save progress after every candidate, finish).

Only one search of a policy is queued or running at once: ``active_policy_id`` is unique, so
a second start, from any server or worker, is refused by the database (``InvalidState``, 409,
naming the running search). Starting a policy whose latest search was cancelled or failed
resumes that search (same id, its state kept); a running search whose worker died (owner
process gone, or lease expired) is taken over by the next start.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from registry.errors import InvalidInput, InvalidState, NotFound
from registry.models import utcnow
from registry.search_models import (
    ACTIVE,
    MergeSearch,
    MergeSearchPublic,
    SearchCandidate,
    SearchStatus,
)
from registry.services import policies as policy_service
from registry.services import searches
from registry.services.compatibility import tensor_shapes
from registry.services.policy_rules import parse_selector
from registry.services.search_leases import is_stale, unclaimed

RESUMABLE = (SearchStatus.cancelled, SearchStatus.failed)


def get_search(*, session: Session, search_id: int) -> MergeSearch:
    row = session.get(MergeSearch, search_id)
    if row is None:
        raise NotFound(f"merge search {search_id} not found")
    return row


def list_searches(
    *,
    session: Session,
    policy_id: int | None = None,
    status: SearchStatus | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[MergeSearch], int]:
    """Searches newest first, and how many match."""
    query = select(MergeSearch)
    if policy_id is not None:
        query = query.where(MergeSearch.policy_id == policy_id)
    if status is not None:
        query = query.where(MergeSearch.status == status)
    total = session.exec(select(func.count()).select_from(query.subquery())).one()
    rows = session.exec(query.order_by(col(MergeSearch.id).desc()).offset(offset).limit(limit))
    return list(rows.all()), int(total)


def _active(session: Session, policy_id: int) -> MergeSearch | None:
    query = select(MergeSearch).where(MergeSearch.active_policy_id == policy_id)
    return session.exec(query).first()


def _refuse_active(row: MergeSearch, name: str) -> InvalidState:
    return InvalidState(
        f"policy '{name}' already has search {row.id} {row.status} "
        f"({row.evaluations}/{row.budget_evaluations} evaluations); "
        f"cancel it first (POST /searches/{row.id}/cancel) or watch it (GET /searches/{row.id})"
    )


def check_search_inputs(*, session: Session, policy_id: int) -> list[int]:
    """The ids the policy's search would merge; refuses a policy that cannot search
    (``InvalidInput``) and a selection of fewer than 2 or of different architectures."""
    policy = policy_service.get_policy(session=session, policy_id=policy_id)
    owner = f"policy '{policy.name}'"
    if policy.search is None:
        raise InvalidInput(f"{owner} has no 'search'; create a search policy to start a search")
    if policy.evaluator is None:
        raise InvalidInput(f"{owner}: a search needs an 'evaluator' to score its candidates")
    searches.parse_search(policy.search, owner=owner)
    chosen = policy_service.select_inputs(session=session, selector=parse_selector(policy.selector))
    if len(chosen) < 2:
        raise InvalidState(
            f"{owner}: the selector finds {len(chosen)} ready checkpoint(s); a search needs at least 2"
        )
    first = chosen[0]
    shapes = tensor_shapes(session, first)
    for other in chosen[1:]:
        theirs = tensor_shapes(session, other)
        for name in sorted(set(shapes) | set(theirs)):
            if shapes.get(name) != theirs.get(name):
                raise InvalidInput(
                    f"{owner}: checkpoint {other.id} '{other.name}' has a different architecture "
                    f"than checkpoint {first.id} '{first.name}': tensor '{name}' is "
                    f"{theirs.get(name, 'missing')} vs {shapes.get(name, 'missing')}"
                )
    return [c.id or 0 for c in chosen]


def start_search(
    *, session: Session, policy_id: int, resume: bool = True, claim_grace_s: float | None = None
) -> tuple[MergeSearch, bool]:
    """Queue a search of the policy; returns ``(search, resumed)``.

    With ``resume`` a cancelled or failed latest search is queued again with its state. A
    second active search of the policy is refused (``InvalidState`` naming it), unless its
    worker died, or (given ``claim_grace_s``) it stayed queued that long unclaimed: then it is
    launched again.
    """
    policy = policy_service.get_policy(session=session, policy_id=policy_id)
    check_search_inputs(session=session, policy_id=policy_id)
    spec = searches.parse_search(policy.search or {}, owner=f"policy '{policy.name}'")
    active = _active(session, policy_id)
    if active is not None:
        lost = is_stale(active) or (claim_grace_s is not None and unclaimed(active, claim_grace_s))
        if lost and _requeue(session, active, (active.status,)):
            return get_search(session=session, search_id=active.id or 0), True
        raise _refuse_active(active, policy.name)
    if resume:
        latest = session.exec(
            select(MergeSearch)
            .where(MergeSearch.policy_id == policy_id)
            .order_by(col(MergeSearch.id).desc())
        ).first()
        if latest is not None and latest.status in RESUMABLE:
            if _requeue(session, latest, RESUMABLE):
                return get_search(session=session, search_id=latest.id or 0), True
            raise _refuse_active(_active(session, policy_id) or latest, policy.name)
    row = MergeSearch(
        policy_id=policy_id,
        active_policy_id=policy_id,
        algorithm=spec.algorithm,
        budget_evaluations=spec.budget.evaluations,
    )
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # another start won the race
        session.rollback()
        other = _active(session, policy_id)
        if other is None:
            raise
        raise _refuse_active(other, policy.name) from None
    session.refresh(row)
    return row, False


def _requeue(session: Session, row: MergeSearch, statuses: tuple[SearchStatus, ...]) -> bool:
    """Queue ``row`` again if it is still in one of ``statuses`` (exactly one caller wins)."""
    try:
        result = session.execute(
            update(MergeSearch)
            .where(
                col(MergeSearch.id) == row.id,
                col(MergeSearch.status).in_(statuses),
                col(MergeSearch.attempts) == row.attempts,
            )
            .values(
                status=SearchStatus.queued,
                active_policy_id=row.policy_id,
                cancel_requested=False,
                error=None,
                lease_owner=None,
                lease_expires_at=None,
                finished_at=None,
                updated_at=utcnow(),
            )
        )
        session.commit()
    except IntegrityError:  # a new search of the policy became active meanwhile
        session.rollback()
        return False
    session.expire_all()
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def cancel_search(*, session: Session, search_id: int) -> MergeSearch:
    """Stop a search: a queued one (or a running one whose worker died) at once, a running
    one at its next candidate."""
    row = get_search(session=session, search_id=search_id)
    if row.status not in ACTIVE:
        raise InvalidState(
            f"search {search_id} is {row.status}; only a queued or running search can be cancelled"
        )
    now = utcnow()
    values: dict[str, Any] = {"cancel_requested": True, "updated_at": now}
    if row.status == SearchStatus.queued or is_stale(row):
        values.update(
            status=SearchStatus.cancelled,
            active_policy_id=None,
            finished_at=now,
            lease_owner=None,
            lease_expires_at=None,
        )
    session.execute(
        update(MergeSearch)
        .where(
            col(MergeSearch.id) == search_id,
            col(MergeSearch.status) == row.status,
            col(MergeSearch.attempts) == row.attempts,
        )
        .values(**values)
    )
    session.commit()
    session.expire_all()
    return get_search(session=session, search_id=search_id)


def to_public(*, session: Session, row: MergeSearch, resumed: bool = False) -> MergeSearchPublic:
    """The API form: status, progress and the scored candidates."""
    state = row.state or {}
    policy = policy_service.get_policy(session=session, policy_id=row.policy_id)
    budget = (policy.search or {}).get("budget", {})
    best = (state.get("search") or {}).get("best")
    return MergeSearchPublic(
        id=row.id or 0,
        policy_id=row.policy_id,
        status=row.status,
        algorithm=row.algorithm,
        cancel_requested=row.cancel_requested,
        evaluations=row.evaluations,
        budget_evaluations=row.budget_evaluations,
        budget_seconds=budget.get("seconds"),
        elapsed_s=row.elapsed_s,
        best_score=row.best_score,
        best=best,
        candidates=[SearchCandidate(**h) for h in state.get("history", [])],
        checkpoint_id=row.checkpoint_id,
        error=row.error,
        mlflow_run_id=state.get("mlflow_parent_run_id"),
        attempts=row.attempts,
        resumed=resumed,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def fail_queued(*, session: Session, search_id: int, error: str) -> None:
    """Fail a search that is still queued (its launch failed), freeing its policy."""
    now = utcnow()
    session.execute(
        update(MergeSearch)
        .where(col(MergeSearch.id) == search_id, col(MergeSearch.status) == SearchStatus.queued)
        .values(
            status=SearchStatus.failed,
            error=error,
            active_policy_id=None,
            finished_at=now,
            updated_at=now,
        )
    )
    session.commit()
