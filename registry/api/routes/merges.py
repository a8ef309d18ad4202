"""Merge runs: start an ad-hoc merge (idempotent), list and show runs."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response, status

from registry.api.deps import (
    LauncherDep,
    Offset,
    ReaderDep,
    RowId,
    RowIdQuery,
    SessionDep,
    WriterDep,
)
from registry.models import MergeRunStatus
from registry.services import merge_runs as run_service
from registry.services.merge_triggers import MergeTriggers, merge_triggers

router = APIRouter(prefix="/merges", tags=["merges"])


REUSED = {"model": run_service.MergeRunPublic, "description": "An existing run (``reused``)"}


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses={200: REUSED})
def start_merge(
    request: run_service.MergeRequest,
    session: SessionDep,
    launcher: LauncherDep,
    _: WriterDep,
    response: Response,
) -> run_service.MergeRunPublic:
    """Queue a merge (202); the same inputs + method + params return the existing run (200).

    An unknown ``evaluator`` is refused (422, listing the installed ones). The evaluator is not
    part of the idempotency key: asking again with another one returns the existing run.

    Instead of ``method``/``params``/``base_id``/``inputs``, the body may carry a mergekit YAML
    as ``{"mergekit": "<yaml text>"}`` (or the same config as a JSON mapping), with checkpoint
    references where mergekit takes paths: ``12`` or ``ckreg/12`` (an id), ``ckreg/my-ft``
    (the newest ready checkpoint named ``my-ft``), ``a+b`` for a model with a LoRA. The run
    stores the config with every reference as ``ckreg/<id>`` (``mergekit_config``; the
    idempotency key covers it), its base is the config's ``base_model`` and its inputs every
    other referenced checkpoint. A bad YAML, an unknown key or parameter, or a reference to no
    ready checkpoint is a 422 whose ``detail`` names the key (e.g. ``models[1].model``).
    The output is a model folder: config.json, generation config, tokenizer, and a README
    model card listing the inputs as ``ckreg/<id>``.
    """
    run, launch = run_service.create_merge_run(session=session, request=request)
    if launch:
        launcher.merge_requested(run.id or 0)
    else:
        response.status_code = status.HTTP_200_OK
    return run_service.to_public(session=session, run=run, reused=not launch)


@router.get("")
def list_merges(
    session: SessionDep,
    _: ReaderDep,
    status_: MergeRunStatus | None = Query(default=None, alias="status"),
    policy_id: RowIdQuery = None,
    input_checkpoint_id: RowIdQuery = None,
    limit: int = Query(default=50, ge=1, le=1000),
    offset: Offset = 0,
) -> run_service.MergeRunPage:
    """Runs newest first; ``input_checkpoint_id`` keeps the runs that take that checkpoint."""
    runs, total = run_service.list_merge_runs(
        session=session,
        status=status_,
        policy_id=policy_id,
        input_checkpoint_id=input_checkpoint_id,
        limit=limit,
        offset=offset,
    )
    items = [run_service.to_public(session=session, run=run) for run in runs]
    return run_service.MergeRunPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/triggered-by/{checkpoint_id}")
def triggered_by(checkpoint_id: RowId, session: SessionDep, _: ReaderDep) -> MergeTriggers:
    """The runs a checkpoint takes part in, and the on_register policies that will take it but
    have not planned their run yet (``ckreg register --wait`` polls this)."""
    return merge_triggers(session=session, checkpoint_id=checkpoint_id)


@router.get("/{run_id}")
def show_merge(run_id: RowId, session: SessionDep, _: ReaderDep) -> run_service.MergeRunPublic:
    run = run_service.get_merge_run(session=session, run_id=run_id)
    return run_service.to_public(session=session, run=run)
