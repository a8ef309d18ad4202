"""Merge policies: create (validated), list, show, enable/disable, and run now."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, StrictBool

from registry.api.deps import LauncherDep, ReaderDep, RowId, SessionDep, WriterDep
from registry.models import MergePolicyCreate, MergePolicyPublic, MergeTrigger
from registry.services import merge_runs as run_service
from registry.services import policies as policy_service

router = APIRouter(prefix="/policies", tags=["policies"])


class PolicyCreate(MergePolicyCreate):
    """A new policy; ``enabled`` must be a JSON boolean (``0`` or ``"yes"`` are refused)."""

    enabled: StrictBool = True


class PolicyUpdate(BaseModel):
    """The fields a PATCH may change (``enabled``: a JSON boolean, not ``0``/``1``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool


@router.post("", status_code=status.HTTP_201_CREATED)
def create_policy(data: PolicyCreate, session: SessionDep, _: WriterDep) -> MergePolicyPublic:
    policy = policy_service.create_policy(session=session, data=data)
    return MergePolicyPublic.model_validate(policy)


@router.get("")
def list_policies(
    session: SessionDep,
    _: ReaderDep,
    trigger: MergeTrigger | None = None,
    enabled: bool | None = None,
) -> list[MergePolicyPublic]:
    rows = policy_service.list_policies(session=session, trigger=trigger, enabled=enabled)
    return [MergePolicyPublic.model_validate(row) for row in rows]


@router.get("/{policy_id}")
def show_policy(policy_id: RowId, session: SessionDep, _: ReaderDep) -> MergePolicyPublic:
    policy = policy_service.get_policy(session=session, policy_id=policy_id)
    return MergePolicyPublic.model_validate(policy)


@router.patch("/{policy_id}")
def update_policy(
    policy_id: RowId, data: PolicyUpdate, session: SessionDep, _: WriterDep
) -> MergePolicyPublic:
    policy = policy_service.set_policy_enabled(
        session=session, policy_id=policy_id, enabled=data.enabled
    )
    return MergePolicyPublic.model_validate(policy)


@router.delete("/{policy_id}")
def disable_policy(policy_id: RowId, session: SessionDep, _: WriterDep) -> MergePolicyPublic:
    """Policies are disabled, not removed: their merge runs keep referring to them."""
    policy = policy_service.set_policy_enabled(session=session, policy_id=policy_id, enabled=False)
    return MergePolicyPublic.model_validate(policy)


QUEUED = {"model": run_service.MergeRunPublic, "description": "A new run, queued"}


@router.post("/{policy_id}/run", responses={202: QUEUED})
def run_policy(
    policy_id: RowId, session: SessionDep, launcher: LauncherDep, _: WriterDep, response: Response
) -> run_service.MergeRunPublic | None:
    """Start the policy's merge now; 204-like ``null`` when the selector yields too few inputs."""
    planned = policy_service.plan_policy_run(session=session, policy_id=policy_id)
    if planned is None:
        response.status_code = status.HTTP_200_OK
        return None
    run, launch = planned
    if launch:
        launcher.merge_requested(run.id or 0)
        response.status_code = status.HTTP_202_ACCEPTED
    return run_service.to_public(session=session, run=run, reused=not launch)
