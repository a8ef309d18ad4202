"""Embedded ready events: a checkpoint no on_register policy covers is only tracked (MLflow
outbox here), without a Prefect flow run; one a policy covers still runs ``on_checkpoint_ready``
and its merge."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort

from flows.launchers import checkpoint_ready_job
from flows.tracking.outbox import Outbox
from registry.models import MergeRunStatus
from registry.services import merge_runs as run_service
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state


def _ready_flow_run_ids() -> set[str]:
    """Ids of every ``on_checkpoint_ready`` flow run on the session's Prefect server (shared
    with other test modules: compare against the ids taken at the start of a test)."""
    named = FlowFilter(name=FlowFilterName(any_=["on_checkpoint_ready"]))
    ids: set[str] = set()
    with get_client(sync_client=True) as client:
        while True:  # the API pages at 200 runs
            page = client.read_flow_runs(
                flow_filter=named, limit=200, offset=len(ids), sort=FlowRunSort.ID_DESC
            )
            ids.update(str(run.id) for run in page)
            if len(page) < 200:
                return ids


def _queued_checkpoints(env: FlowEnv) -> list[int]:
    outbox = Outbox(env.settings.home.resolve() / "mlflow-outbox")
    return [e.payload["id"] for e in outbox.pending() if e.kind == "checkpoint"]


def test_ready_without_policy_tracks_without_a_flow_run(flow_env: FlowEnv) -> None:
    earlier = _ready_flow_run_ids()

    def _ready_flow_runs() -> int:
        return len(_ready_flow_run_ids() - earlier)

    base = flow_env.register("base", tiny_state(0), kind="base")
    checkpoint_ready_job(base)
    assert _ready_flow_runs() == 0
    assert _queued_checkpoints(flow_env) == [base]  # MLflow is down: its record waits

    ft_a = flow_env.register("ft-a", tiny_state(1), base_id=base, task="a")
    flow_env.register("ft-b", tiny_state(2), base_id=base, task="b")
    flow_env.policy(name="avg", method="linear", selector={"base_id": base}, trigger="on_register")
    checkpoint_ready_job(ft_a)
    assert _ready_flow_runs() == 1
    with flow_env.session() as session:
        [run] = run_service.list_merge_runs(session=session)[0]
        assert run.status == MergeRunStatus.succeeded, run.error
    # A policy that covers only other checkpoints (another base) does not start a flow either.
    other = flow_env.register("other-base", tiny_state(4), kind="base")
    checkpoint_ready_job(other)
    assert _ready_flow_runs() == 1
