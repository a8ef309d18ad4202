"""Idempotent merge runs, and a merge that fails midway: run failed, nothing ready, re-run works."""

from __future__ import annotations

from sqlmodel import select

from flows.pipelines import merge_checkpoints
from registry.models import Checkpoint, MergeRunStatus
from registry.services import merge_runs as run_service
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded, FlakyEvaluator, FlowEnv, tiny_state


def _request(base: int, ids: list[int], **params: float) -> run_service.MergeRequest:
    return run_service.MergeRequest(
        method="ties",
        base_id=base,
        params={"density": 0.5, **params},
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in ids],
    )


def test_same_inputs_method_params_reuse_the_run(flow_env: FlowEnv) -> None:
    base = flow_env.register("base", tiny_state(0), kind="base")
    a = flow_env.register("a", tiny_state(1), base_id=base, task="a")
    b = flow_env.register("b", tiny_state(2), base_id=base, task="b")
    with flow_env.session() as session:
        first, launch = run_service.create_merge_run(
            session=session, request=_request(base, [a, b])
        )
        assert launch
        again, launch_again = run_service.create_merge_run(
            session=session, request=_request(base, [a, b])
        )
        assert again.id == first.id and not launch_again
        other, launch_other = run_service.create_merge_run(
            session=session, request=_request(base, [a, b], density=0.9)
        )
        assert other.id != first.id and launch_other
    output = merge_checkpoints(first.id)
    assert merge_checkpoints(first.id) == output  # a finished run is not merged twice
    with flow_env.session() as session:
        done, launch = run_service.create_merge_run(session=session, request=_request(base, [a, b]))
        assert done.id == first.id and not launch and done.status == MergeRunStatus.succeeded
        merged = session.exec(select(Checkpoint).where(Checkpoint.kind == "merged")).all()
        assert [c.id for c in merged] == [output]


def test_failed_merge_leaves_nothing_ready_and_rerun_succeeds(embedded: Embedded) -> None:
    FlakyEvaluator.calls = 0  # NaN on its first call in this process, whatever ran before
    api, headers = embedded.client, embedded.headers
    base = embedded.upload("base", tiny_state(0), kind="base")
    a = embedded.upload("a", tiny_state(1), base_id=base["id"], task="a")
    b = embedded.upload("b", tiny_state(2), base_id=base["id"], task="b")
    body = {
        "method": "task_arithmetic",
        "base_id": base["id"],
        "inputs": [{"checkpoint_id": a["id"]}, {"checkpoint_id": b["id"]}],
        "evaluator": "ckreg-test-flaky",
    }
    policy = api.post(
        "/api/v1/policies",
        json={
            "name": "flaky",
            "method": "task_arithmetic",
            "selector": {"base_id": base["id"]},
            "trigger": "manual",
            "evaluator": "ckreg-test-flaky",
        },
        headers=headers,
    )
    assert policy.status_code == 201, policy.text
    started = api.post(f"/api/v1/policies/{policy.json()['id']}/run", headers=headers)
    assert started.status_code == 202, started.text
    assert embedded.launcher.wait_idle(60)
    run = api.get(f"/api/v1/merges/{started.json()['id']}").json()
    assert run["status"] == "failed"
    assert "score" in run["error"] and "not finite" in run["error"]
    merged = api.get("/api/v1/checkpoints", params={"kind": "merged"}).json()["items"]
    assert merged and all(c["status"] == "failed" for c in merged)  # the output was withdrawn

    rerun = api.post(f"/api/v1/policies/{policy.json()['id']}/run", headers=headers)
    assert rerun.status_code == 202 and rerun.json()["id"] == run["id"]
    assert embedded.launcher.wait_idle(60)
    run = api.get(f"/api/v1/merges/{run['id']}").json()
    assert run["status"] == "succeeded", run["error"]
    ready = api.get("/api/v1/checkpoints", params={"kind": "merged", "status": "ready"}).json()[
        "items"
    ]
    assert [c["id"] for c in ready] == [run["output_checkpoint_id"]]
    assert body  # the ad-hoc form of the same merge is covered in test_embedded_e2e
