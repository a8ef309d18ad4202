"""Search policies through the flow: CMA-ES finds the best λ, M2N2 evolves an archive, a
killed search resumes where it stopped, a cancel stops it, candidates are MLflow child runs,
and bad search policies are refused naming the field."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch

from flows import runtime as flow_runtime
from flows.search_flow import cancel_search, merge_search
from registry.errors import InvalidInput, InvalidState
from registry.models import CheckpointKind
from registry.search_models import MergeSearch
from registry.services import search_runs
from registry.services.lineage import get_lineage
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state

TARGET_LAMBDA = 0.7


def _target() -> dict[str, torch.Tensor]:
    base, a, b = tiny_state(0), tiny_state(1), tiny_state(2)
    return {k: base[k] + TARGET_LAMBDA * ((a[k] - base[k]) + (b[k] - base[k])) for k in base}


class TargetEvaluator:
    """Scores closeness to a fixed target; can crash or cancel at a given call (tests)."""

    name = "ckreg-test-target"
    calls = 0
    crash_at: int | None = None
    cancel_at: tuple[int, int] | None = None  # (call, search id)
    delay_s = 0.0

    def _tick(self) -> None:
        TargetEvaluator.calls += 1
        time.sleep(self.delay_s)
        if self.crash_at is not None and TargetEvaluator.calls == self.crash_at:
            raise RuntimeError("worker killed (test)")
        if self.cancel_at is not None and TargetEvaluator.calls == self.cancel_at[0]:
            cancel_search(self.cancel_at[1])

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        self._tick()
        target = _target()
        return {"score": -sum(float(((state_dict[k] - t) ** 2).sum()) for k, t in target.items())}

    def per_example(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._tick()
        target = _target()
        return {k: torch.exp(-((state_dict[k] - t) ** 2)).reshape(-1) for k, t in target.items()}

    def objective(self) -> Any:
        raise NotImplementedError

    def fisher(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@pytest.fixture(scope="module")
def target_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    root = tmp_path_factory.mktemp("search-plugins")
    dist = root / "ckreg_search_test-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ckreg-search-test\nVersion: 0.0.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[ckreg.evaluators]\nckreg-test-target = tests.flows.test_search_flow:TargetEvaluator\n"
    )
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))


@pytest.fixture
def env(flow_env: FlowEnv, target_plugin: None) -> FlowEnv:
    TargetEvaluator.calls, TargetEvaluator.crash_at, TargetEvaluator.cancel_at = 0, None, None
    TargetEvaluator.delay_s = 0.0
    return flow_env


def _family(env: FlowEnv) -> int:
    base = env.register("base", tiny_state(0), kind=CheckpointKind.base)
    env.register("ft-a", tiny_state(1), base_id=base, task="a")
    env.register("ft-b", tiny_state(2), base_id=base, task="b")
    return base


def _cma_policy(env: FlowEnv, base: int, name: str = "search", evaluations: int = 12) -> int:
    search = {"algorithm": "cma_es", "budget": {"evaluations": evaluations},
              "space": {"lambda": [0.0, 2.0]}, "metric": "score", "seed": 3}  # fmt: skip
    return env.policy(name=name, method="task_arithmetic", selector={"base_id": base},
                      evaluator="ckreg-test-target", search=search)  # fmt: skip


def _start(env: FlowEnv, policy_id: int, resume: bool = True) -> int:
    """Queue a search of the policy through the service (what POST /policies/{id}/searches does)."""
    with env.session() as session:
        row, _ = search_runs.start_search(session=session, policy_id=policy_id, resume=resume)
    return row.id or 0


def _search(env: FlowEnv, policy_id: int) -> int | None:
    """Start (or resume) the policy's search and run it here; the registered checkpoint."""
    return merge_search(_start(env, policy_id))


def _row(env: FlowEnv, policy_id: int) -> MergeSearch:
    with env.session() as session:
        rows, _ = search_runs.list_searches(session=session, policy_id=policy_id)
    assert rows
    return rows[0]


def _state(env: FlowEnv, policy_id: int) -> dict[str, Any]:
    row = _row(env, policy_id)
    assert row.state is not None
    return {**row.state, "status": str(row.status), "checkpoint_id": row.checkpoint_id}


def test_cma_es_search_registers_the_best_lambda_with_its_recipe(env: FlowEnv) -> None:
    base = _family(env)
    policy = _cma_policy(env, base, evaluations=16)
    best = _search(env, policy)
    state = _state(env, policy)
    assert state["status"] == "finished" and state["evaluations"] == 16
    assert len(state["history"]) == 16 and TargetEvaluator.calls == 16
    with env.session() as session:
        from registry.services.checkpoints import get_checkpoint

        checkpoint = get_checkpoint(session=session, checkpoint_id=best)
        recipe = checkpoint.meta["search"]
        lineage = get_lineage(session=session, checkpoint_id=best)
    assert recipe["method"] == "task_arithmetic" and recipe["algorithm"] == "cma_es"
    assert abs(recipe["params"]["lambda"] - TARGET_LAMBDA) < 0.1
    assert recipe["score"] == max(h["score"] for h in state["history"])
    parents = {(e.parent_id, str(e.role)) for e in lineage.ancestors if e.depth == 1}
    assert (base, "base") in parents and len(parents) == 3  # the base and both inputs
    search_id = _row(env, policy).id or 0
    assert merge_search(search_id) == best  # finished: running it again changes nothing


def test_a_killed_search_resumes_where_it_stopped(env: FlowEnv) -> None:
    base = _family(env)
    straight = _cma_policy(env, base, name="straight", evaluations=10)
    _search(env, straight)
    TargetEvaluator.calls, TargetEvaluator.crash_at = 0, 7
    killed = _cma_policy(env, base, name="killed", evaluations=10)
    with pytest.raises(RuntimeError, match="worker killed"):
        _search(env, killed)
    failed = _row(env, killed)
    assert failed.status == "failed" and "worker killed" in (failed.error or "")
    assert failed.evaluations == 6 and failed.active_policy_id is None
    TargetEvaluator.calls, TargetEvaluator.crash_at = 0, None
    assert _start(env, killed) == failed.id  # resumed: the same search
    merge_search(failed.id or 0)
    assert TargetEvaluator.calls == 4  # only the 4 candidates left were scored
    resumed, uninterrupted = _state(env, killed), _state(env, straight)
    assert [h["score"] for h in resumed["history"]] == [
        h["score"] for h in uninterrupted["history"]
    ]
    assert resumed["search"]["optimizer"] == uninterrupted["search"]["optimizer"]


def test_cancel_stops_at_the_next_candidate_and_a_restart_resumes(env: FlowEnv) -> None:
    base = _family(env)
    policy = _cma_policy(env, base, evaluations=8)
    search_id = _start(env, policy)
    TargetEvaluator.cancel_at = (3, search_id)
    assert merge_search(search_id) is None
    state = _state(env, policy)
    assert state["status"] == "cancelled" and state["evaluations"] == 3
    TargetEvaluator.cancel_at = None
    assert _search(env, policy) is not None
    assert _state(env, policy)["evaluations"] == 8 and _row(env, policy).id == search_id


def test_m2n2_search_evolves_an_archive_and_registers_its_best(env: FlowEnv) -> None:
    base = _family(env)
    env.register("ft-c", tiny_state(3), base_id=base, task="c")
    search = {"algorithm": "m2n2", "budget": {"evaluations": 12}, "archive_size": 3, "seed": 1}
    policy = env.policy(name="m2n2", method="linear", selector={"base_id": base},
                        evaluator="ckreg-test-target", search=search)  # fmt: skip
    best = _search(env, policy)
    state = _state(env, policy)
    archive = state["search"]["archive"]
    assert len(archive["ids"]) == 3 and state["evaluations"] == 12
    inputs = [h["score"] for h in state["history"][:3]]
    assert max(h["score"] for h in state["history"]) >= max(inputs)
    with env.session() as session:
        from registry.services.checkpoints import get_checkpoint

        recipe = get_checkpoint(session=session, checkpoint_id=best).meta["search"]
    assert recipe["algorithm"] == "m2n2" and "derivation" in recipe
    assert recipe["score"] == pytest.approx(max(sum(s) / len(s) for s in archive["scores"]))


def test_candidates_are_mlflow_child_runs(env: FlowEnv, mlflow_server: Any) -> None:
    from mlflow import MlflowClient

    settings = env.settings.model_copy(
        update={"mlflow_tracking_uri": mlflow_server.url, "mlflow_experiment": "search-test"}
    )
    flow_runtime.configure(settings)
    base = _family(env)
    policy = _cma_policy(env, base, evaluations=2)
    _search(env, policy)
    parent = _state(env, policy)["mlflow_parent_run_id"]
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("search-test")
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert len(children) == 2
    assert all("lambda" in r.data.params and "score" in r.data.metrics for r in children)


BAD_SEARCHES = [
    ({"algorithm": "cma_es", "budget": {"evaluations": 0}, "space": {"lambda": [0, 1]}},
     {}, "search.budget.evaluations"),
    ({"algorithm": "cma_es", "budget": {"evaluations": 3}, "space": {"lambda": [0, 1]}},
     {"evaluator": None}, "needs an 'evaluator'"),
    ({"algorithm": "cma_es", "budget": {"evaluations": 3}, "space": {"lamda": [0, 1]}},
     {}, "unknown parameter 'lamda'"),
    ({"algorithm": "cma_es", "budget": {"evaluations": 3}, "space": {"lambda": [1, 0]}},
     {}, "search.space.lambda"),
    ({"algorithm": "cma_es", "budget": {"evaluations": 3}}, {}, "search.space"),
    ({"algorithm": "greedy", "budget": {"evaluations": 3}}, {}, "search.algorithm"),
    ({"algorithm": "m2n2", "budget": {"evaluations": 3}}, {"trigger": "on_register"},
     "'trigger' must be 'manual'"),
]  # fmt: skip


def test_bad_searches_are_refused_naming_the_field(env: FlowEnv) -> None:
    base = env.register("base", tiny_state(0), kind=CheckpointKind.base)
    env.register("ft-a", tiny_state(1), base_id=base, task="a")
    for search, fields, message in BAD_SEARCHES:
        data = {"name": "bad", "method": "task_arithmetic", "selector": {"base_id": base},
                "evaluator": "ckreg-test-target", "search": search, **fields}  # fmt: skip
        with pytest.raises(InvalidInput, match=re.escape(message)):
            env.policy(**data)
    policy = _cma_policy(env, base)  # valid, but the selector finds one checkpoint
    with pytest.raises(InvalidState, match="at least 2"):
        _start(env, policy)
    with env.session() as session:
        assert search_runs.list_searches(session=session)[1] == 0  # nothing half-done


def test_the_seconds_budget_stops_the_search_and_a_plain_policy_has_none(env: FlowEnv) -> None:
    base = _family(env)
    search = {"algorithm": "cma_es", "budget": {"evaluations": 50, "seconds": 1e-6},
              "space": {"lambda": [0.0, 2.0]}, "metric": "score"}  # fmt: skip
    policy = env.policy(name="timed", method="task_arithmetic", selector={"base_id": base},
                        evaluator="ckreg-test-target", search=search)  # fmt: skip
    assert _search(env, policy) is not None
    state = _state(env, policy)
    assert state["status"] == "finished" and state["evaluations"] == 1
    plain = env.policy(name="plain", method="task_arithmetic", selector={"base_id": base})
    with pytest.raises(InvalidInput, match="has no 'search'"):
        _start(env, plain)
