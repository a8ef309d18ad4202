"""Policy-driven flows: ``on_checkpoint_ready`` (on_register policies) and ``sequential_merge``.

``sequential_merge(policy_id)`` runs a policy now — scheduled by cron or asked for manually.
With a continual method (OPCM, the default for folding) and window ``all_since_last_fold`` it
folds the checkpoints that arrived since the last fold, resuming from the stored merge state.
"""

from __future__ import annotations

import logging

from prefect import flow

from flows.merge_flow import in_background, merge_checkpoints, track_checkpoint
from flows.runtime import current_runtime
from registry.services import policies as policy_service
from registry.services.common import load_checkpoint

log = logging.getLogger(__name__)


def _plan(policy_id: int) -> int | None:
    """The id of a run to launch for the policy now, or None (nothing new / already done)."""
    with current_runtime().session() as session:
        planned = policy_service.plan_policy_run(session=session, policy_id=policy_id)
    if planned is None:
        return None
    run, launch = planned
    return run.id if launch else None


@flow(name="on_checkpoint_ready", persist_result=False)
def on_checkpoint_ready(checkpoint_id: int) -> list[int]:
    """Log the new checkpoint to MLflow, then run every enabled on_register policy that covers
    it; returns run ids."""
    in_background(track_checkpoint, checkpoint_id)
    with current_runtime().session() as session:
        checkpoint = load_checkpoint(session, checkpoint_id)
        policy_ids = [
            p.id or 0
            for p in policy_service.matching_policies(session=session, checkpoint=checkpoint)
        ]
    started: list[int] = []
    for policy_id in policy_ids:
        run_id = _plan(policy_id)
        if run_id is None:
            continue
        started.append(run_id)
        try:
            merge_checkpoints(run_id)
        except Exception:  # one policy's failure must not stop the others (run is marked failed)
            log.exception("merge run %s of policy %s failed", run_id, policy_id)
    return started


@flow(name="sequential_merge", persist_result=False)
def sequential_merge(policy_id: int) -> int | None:
    """Run policy ``policy_id`` now; returns the merged checkpoint's id (None if nothing to do)."""
    run_id = _plan(policy_id)
    if run_id is None:
        return None
    return merge_checkpoints(run_id)
