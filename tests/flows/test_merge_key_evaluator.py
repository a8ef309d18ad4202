"""The merge-run idempotency key includes the evaluator only for methods that learn from its
objective (fw, adamerging, regmean_plusplus: ``Need.OBJECTIVE``), whose output it changes."""

from __future__ import annotations

import hashlib
import json

import pytest

from registry.services import merge_runs as run_service
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state

EVALUATORS = ("ckreg-test-norm", "ckreg-test-slow")


def _request(method: str, base: int, inputs: list[int], evaluator: str) -> run_service.MergeRequest:
    return run_service.MergeRequest(
        method=method,
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in inputs],
        evaluator=evaluator,
    )


@pytest.mark.parametrize("method", ["fw", "adamerging", "regmean_plusplus"])
def test_objective_methods_get_one_run_per_evaluator(flow_env: FlowEnv, method: str) -> None:
    base = flow_env.register("base", tiny_state(0), kind="base")
    inputs = [flow_env.register(f"ft-{i}", tiny_state(i), base_id=base) for i in (1, 2)]
    with flow_env.session() as session:
        first, launch_first = run_service.create_merge_run(
            session=session, request=_request(method, base, inputs, EVALUATORS[0])
        )
        other, launch_other = run_service.create_merge_run(
            session=session, request=_request(method, base, inputs, EVALUATORS[1])
        )
        again, launch_again = run_service.create_merge_run(
            session=session, request=_request(method, base, inputs, EVALUATORS[0])
        )
    assert launch_first and launch_other and not launch_again
    assert other.id != first.id and other.evaluator == EVALUATORS[1]
    assert again.id == first.id


def test_other_methods_keep_one_run_and_their_old_key(flow_env: FlowEnv) -> None:
    base = flow_env.register("base", tiny_state(0), kind="base")
    inputs = [flow_env.register(f"ft-{i}", tiny_state(i), base_id=base) for i in (1, 2)]
    request = _request("task_arithmetic", base, inputs, EVALUATORS[0])
    with flow_env.session() as session:
        first, _ = run_service.create_merge_run(session=session, request=request)
        other, launch = run_service.create_merge_run(
            session=session, request=_request("task_arithmetic", base, inputs, EVALUATORS[1])
        )
    assert other.id == first.id and not launch and other.evaluator == EVALUATORS[0]
    # The key of a method that only gets scored is the one computed before evaluators counted.
    canonical = {
        "method": "task_arithmetic",
        "params": {},
        "base_id": base,
        "inputs": [i.model_dump(mode="json") for i in request.inputs],
        "policy_id": None,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    assert first.idempotency_key == hashlib.sha256(text.encode()).hexdigest()
