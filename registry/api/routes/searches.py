"""Merge searches: start one for a search policy, watch its progress, list, cancel.

``POST /policies/{id}/searches`` queues a search (202) and hands it to the launcher (in-process
in embedded mode, the ``ckreg-search`` deployment in server mode). A policy has at most one
queued or running search: a second start is 409 naming it. A cancelled or failed search is
resumed by the next start (same id, ``resumed: true``) unless the body says
``{"resume": false}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, StrictBool

from registry.api.deps import (
    LauncherDep,
    Offset,
    ReaderDep,
    RowId,
    RowIdQuery,
    SessionDep,
    SettingsDep,
    WriterDep,
)
from registry.search_models import MergeSearchPage, MergeSearchPublic, SearchStatus
from registry.services import search_runs

router = APIRouter(tags=["searches"])


class SearchStart(BaseModel):
    """``resume``: continue the policy's cancelled or failed latest search (default) instead
    of starting a new one."""

    model_config = ConfigDict(extra="forbid")

    resume: StrictBool = True


@router.post("/policies/{policy_id}/searches", status_code=status.HTTP_202_ACCEPTED)
def start_search(
    policy_id: RowId,
    session: SessionDep,
    launcher: LauncherDep,
    settings: SettingsDep,
    _: WriterDep,
    body: SearchStart | None = None,
) -> MergeSearchPublic:
    """Queue the policy's search (202) and start it.

    Refused: a policy without ``search`` or ``evaluator`` (422), a selection of fewer than 2
    ready checkpoints (409) or of checkpoints with different architectures (422, naming the
    checkpoint and tensor), a policy with a search queued or running already (409, naming
    that search). Problems found while running (an evaluator without the metric, a missing
    ``features`` artifact for pleas/ot_fusion) fail the search: ``status: failed`` and
    ``error`` name the cause, and nothing is registered.
    """
    row, resumed = search_runs.start_search(
        session=session,
        policy_id=policy_id,
        resume=(body or SearchStart()).resume,
        claim_grace_s=settings.merge_claim_grace_s,
    )
    try:
        launcher.search_requested(row.id or 0)
    except Exception as exc:  # no flow will run it: free the policy (a later start resumes)
        search_runs.fail_queued(session=session, search_id=row.id or 0,
                                error=f"could not be handed to the flows: {type(exc).__name__}: {exc}")  # fmt: skip
        raise
    return search_runs.to_public(session=session, row=row, resumed=resumed)


@router.get("/searches")
def list_searches(
    session: SessionDep,
    _: ReaderDep,
    policy_id: RowIdQuery = None,
    status_: SearchStatus | None = Query(default=None, alias="status"),
    limit: int = Query(default=50, ge=1, le=1000),
    offset: Offset = 0,
) -> MergeSearchPage:
    """Searches newest first."""
    rows, total = search_runs.list_searches(
        session=session, policy_id=policy_id, status=status_, limit=limit, offset=offset
    )
    items = [search_runs.to_public(session=session, row=row) for row in rows]
    return MergeSearchPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/searches/{search_id}")
def show_search(search_id: RowId, session: SessionDep, _: ReaderDep) -> MergeSearchPublic:
    """Status and progress: evaluations done of the budget, best score, every candidate's
    score, the registered checkpoint once finished, the error once failed."""
    row = search_runs.get_search(session=session, search_id=search_id)
    return search_runs.to_public(session=session, row=row)


@router.post("/searches/{search_id}/cancel")
def cancel_search(search_id: RowId, session: SessionDep, _: WriterDep) -> MergeSearchPublic:
    """Stop the search: a queued one at once (``cancelled``), a running one at its next
    candidate (``cancel_requested: true`` until then). A later start resumes it. A search
    that already ended is 409."""
    row = search_runs.cancel_search(session=session, search_id=search_id)
    return search_runs.to_public(session=session, row=row)
