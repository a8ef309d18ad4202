"""Merge searches over REST with the embedded launcher (real Prefect harness): start, watch,
cancel and resume; one active search per policy (409 naming it, also when two starts race on
SQLite and PostgreSQL); bad input refused with the documented error shape."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from flows import runtime as flow_runtime
from flows.launchers import EmbeddedLauncher
from flows.search_flow import merge_search
from registry.api.app import create_app
from registry.db import make_engine, upgrade_database
from registry.errors import InvalidState
from registry.models import CheckpointKind, MergePolicyCreate
from registry.search_models import MergeSearch
from registry.services import create_token, search_leases, search_runs
from registry.services import policies as policy_service
from registry.settings import Settings
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded, FlowEnv, tiny_state
from tests.flows.test_search_flow import TargetEvaluator, _cma_policy, _family, target_plugin

__all__ = ["target_plugin"]


def _wait(client: TestClient, search_id: int, until: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = client.get(f"/api/v1/searches/{search_id}").json()
        if until(found):
            return found
        time.sleep(0.05)
    raise AssertionError(f"search {search_id} never got there: {found}")


@pytest.fixture
def api(embedded: Embedded, target_plugin: None) -> Embedded:
    TargetEvaluator.calls, TargetEvaluator.crash_at, TargetEvaluator.cancel_at = 0, None, None
    TargetEvaluator.delay_s = 0.0
    return embedded


def test_start_watch_cancel_and_resume_over_rest(api: Embedded) -> None:
    base = _family(api.env)
    policy = _cma_policy(api.env, base, evaluations=8)
    TargetEvaluator.delay_s = 0.3
    started = api.client.post(f"/api/v1/policies/{policy}/searches", headers=api.headers)
    assert started.status_code == 202, started.text
    search = started.json()
    assert search["status"] == "queued" and search["budget_evaluations"] == 8
    sid = search["id"]
    again = api.client.post(f"/api/v1/policies/{policy}/searches", headers=api.headers)
    assert again.status_code == 409
    assert again.json()["detail"]["error"] == "invalid_state"
    assert f"search {sid}" in again.json()["detail"]["message"]
    _wait(api.client, sid, lambda s: s["evaluations"] >= 2)
    asked = time.monotonic()
    cancel = api.client.post(f"/api/v1/searches/{sid}/cancel", headers=api.headers)
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    stopped = _wait(api.client, sid, lambda s: s["status"] == "cancelled")
    cancel_s = time.monotonic() - asked
    assert 2 <= stopped["evaluations"] < 8 and stopped["checkpoint_id"] is None
    assert len(stopped["candidates"]) == stopped["evaluations"]
    TargetEvaluator.delay_s = 0.0
    asked = time.monotonic()
    resumed = api.client.post(f"/api/v1/policies/{policy}/searches", headers=api.headers)
    assert resumed.status_code == 202 and resumed.json()["resumed"] is True
    assert resumed.json()["id"] == sid
    calls_before = TargetEvaluator.calls
    _wait(api.client, sid, lambda s: s["evaluations"] > stopped["evaluations"])
    resume_s = time.monotonic() - asked
    done = _wait(api.client, sid, lambda s: s["status"] == "finished")
    assert (
        done["evaluations"] == 8
        and TargetEvaluator.calls - calls_before == 8 - stopped["evaluations"]
    )
    assert done["checkpoint_id"] is not None and done["best_score"] == max(
        c["score"] for c in done["candidates"]
    )
    assert done["best"]["params"]["lambda"] >= 0
    listed = api.client.get("/api/v1/searches", params={"policy_id": policy}).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == sid
    ended = api.client.post(f"/api/v1/searches/{sid}/cancel", headers=api.headers)
    assert ended.status_code == 409 and "finished" in ended.json()["detail"]["message"]
    fresh = api.client.post(f"/api/v1/policies/{policy}/searches", headers=api.headers)
    assert (
        fresh.status_code == 202 and fresh.json()["id"] != sid
    )  # a finished search is not resumed
    _wait(api.client, fresh.json()["id"], lambda s: s["status"] == "finished")
    print(f"cancel took {cancel_s:.2f} s (candidate 0.3 s); resume to its next candidate "
          f"{resume_s:.2f} s")  # fmt: skip


def test_bad_starts_are_refused_and_leave_nothing(api: Embedded) -> None:
    base = _family(api.env)
    url = "/api/v1/policies/{}/searches"
    plain = api.env.policy(name="plain", method="task_arithmetic", selector={"base_id": base})
    refused = api.client.post(url.format(plain), headers=api.headers)
    assert refused.status_code == 422 and "has no 'search'" in refused.json()["detail"]["message"]
    assert api.client.post(url.format(9999), headers=api.headers).status_code == 404
    policy = _cma_policy(api.env, base)
    assert api.client.post(url.format(policy)).status_code == 401
    bad_body = api.client.post(url.format(policy), json={"resume": 1}, headers=api.headers)
    assert bad_body.status_code == 422 and "resume" in bad_body.json()["detail"]["message"]
    assert api.client.get("/api/v1/searches/9999").status_code == 404
    assert api.client.post("/api/v1/searches/9999/cancel", headers=api.headers).status_code == 404
    other = api.env.register("other-arch", {"w": tiny_state(4)["layers.0.weight"]}, task="x")
    search = {"algorithm": "m2n2", "budget": {"evaluations": 3}}
    mixed_policy = api.env.policy(name="mixed", method="linear", selector={"tasks": ["a", "x"]},
                                  evaluator="ckreg-test-target", search=search)  # fmt: skip
    mixed = api.client.post(url.format(mixed_policy), headers=api.headers)
    assert mixed.status_code == 422
    message = mixed.json()["detail"]["message"]
    assert f"checkpoint {other} 'other-arch'" in message and "different architecture" in message
    assert api.client.get("/api/v1/searches").json()["total"] == 0  # nothing half-created


def test_a_failed_search_names_its_cause_and_registers_nothing(api: Embedded) -> None:
    base = _family(api.env)
    search = {"algorithm": "cma_es", "budget": {"evaluations": 3},
              "space": {"lambda": [0.0, 2.0]}, "metric": "accuracy"}  # fmt: skip
    policy = api.env.policy(name="wrong-metric", method="task_arithmetic",
                            selector={"base_id": base}, evaluator="ckreg-test-target",
                            search=search)  # fmt: skip
    started = api.client.post(f"/api/v1/policies/{policy}/searches", headers=api.headers)
    failed = _wait(api.client, started.json()["id"], lambda s: s["status"] == "failed")
    assert "gives no metric 'accuracy'" in failed["error"] and failed["checkpoint_id"] is None
    merged = api.client.get("/api/v1/checkpoints", params={"kind": "merged"}).json()
    assert merged["total"] == 0


def _policy_row(session: Session, base: int, name: str) -> int:
    search = {"algorithm": "cma_es", "budget": {"evaluations": 3}, "space": {"lambda": [0, 1]},
              "metric": "score"}  # fmt: skip
    data = MergePolicyCreate(name=name, method="task_arithmetic", selector={"base_id": base},
                             evaluator="ckreg-test-target", search=search)  # fmt: skip
    return policy_service.create_policy(session=session, data=data).id or 0


def test_two_racing_starts_get_one_search(
    flow_env: FlowEnv, target_plugin: None, database_url: str
) -> None:
    """Two workers start the same policy at once: the database lets exactly one through."""
    settings = Settings(home=flow_env.tmp / "race", database_url=database_url)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    flow_runtime.configure(settings)
    env = FlowEnv(settings=settings, tmp=flow_env.tmp)
    base = env.register("base", tiny_state(0), kind=CheckpointKind.base)
    env.register("ft-a", tiny_state(1), base_id=base, task="a")
    env.register("ft-b", tiny_state(2), base_id=base, task="b")
    with Session(engine) as session:
        policy = _policy_row(session, base, "race")
    barrier, outcomes = threading.Barrier(2), []

    def start() -> None:
        with Session(engine, expire_on_commit=False) as session:
            barrier.wait()
            try:
                outcomes.append(search_runs.start_search(session=session, policy_id=policy)[0].id)
            except InvalidState as exc:
                outcomes.append(exc.message)

    for _ in range(3):  # three rounds: each ends with the winner cancelled (still queued)
        outcomes.clear()
        threads = [threading.Thread(target=start) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        winners = [o for o in outcomes if isinstance(o, int)]
        assert len(winners) == 1, outcomes
        loser = next(o for o in outcomes if isinstance(o, str))
        assert f"search {winners[0]} queued" in loser
        with Session(engine) as session:
            search_runs.cancel_search(session=session, search_id=winners[0])
    with Session(engine) as session:  # the database itself refuses a second active row
        session.add(MergeSearch(policy_id=policy, active_policy_id=policy, algorithm="cma_es"))
        session.add(MergeSearch(policy_id=policy, active_policy_id=policy, algorithm="cma_es"))
        with pytest.raises(IntegrityError):
            session.commit()
    engine.dispose()


def test_a_search_whose_worker_died_is_taken_over(flow_env: FlowEnv, target_plugin: None) -> None:
    base = _family(flow_env)
    policy = _cma_policy(flow_env, base, evaluations=4)
    with flow_env.session() as session:
        row, _ = search_runs.start_search(session=session, policy_id=policy)
        sid = row.id or 0
        assert search_leases.claim_search(session=session, search_id=sid, owner="h:1:x", lease_s=60)
        # a live owner: a second claim and a second start are refused
        assert not search_leases.claim_search(session=session, search_id=sid, owner="h:2:y",
                                            lease_s=60)  # fmt: skip
        with pytest.raises(InvalidState, match=f"search {sid} running"):
            search_runs.start_search(session=session, policy_id=policy)
    with flow_env.session() as session:  # the owner stopped renewing: its lease ran out
        session.execute(
            update(MergeSearch).values(lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
        session.commit()
        again, resumed = search_runs.start_search(session=session, policy_id=policy)
    assert resumed and again.id == sid and again.status == "queued"
    assert merge_search(sid) is not None
    with flow_env.session() as session:
        done = search_runs.get_search(session=session, search_id=sid)
    assert done.status == "finished" and done.attempts == 2 and done.evaluations == 4
    with flow_env.session() as session:  # cancelling a dead worker's search ends it at once
        row, _ = search_runs.start_search(session=session, policy_id=policy)
        claim = dict(session=session, search_id=row.id or 0, owner="h:3:z", lease_s=60)
        assert search_leases.claim_search(**claim)  # type: ignore[arg-type]
        expired = datetime(2000, 1, 1, tzinfo=UTC)
        session.execute(update(MergeSearch).values(lease_expires_at=expired))
        session.commit()
        cancelled = search_runs.cancel_search(session=session, search_id=row.id or 0)
    assert cancelled.status == "cancelled" and cancelled.active_policy_id is None


class _BrokenLauncher:
    def checkpoint_ready(self, checkpoint_id: int) -> None:
        return None

    def merge_requested(self, run_id: int) -> None:
        return None

    def search_requested(self, search_id: int) -> None:
        raise ConnectionError("prefect server down (test)")


def test_a_search_the_launcher_cannot_start_frees_its_policy(
    flow_env: FlowEnv, target_plugin: None
) -> None:
    base = _family(flow_env)
    policy = _cma_policy(flow_env, base, evaluations=2)
    app = create_app(flow_env.settings, launcher=_BrokenLauncher())
    with flow_env.session() as session:
        _, secret = create_token(session=session, name="t", scopes=["write"])
    headers = {"Authorization": f"Bearer {secret}"}
    with TestClient(app, raise_server_exceptions=False) as client:
        url = f"/api/v1/policies/{policy}/searches"
        assert client.post(url, headers=headers).status_code == 500
        failed = client.get("/api/v1/searches").json()["items"][0]
        assert failed["status"] == "failed" and "prefect server down" in failed["error"]
        again = client.post(url, headers=headers)  # not 409: the policy was freed
        assert again.status_code == 500 and client.get("/api/v1/searches").json()["total"] == 1


def test_a_restarted_server_resumes_its_lost_searches(
    flow_env: FlowEnv, target_plugin: None
) -> None:
    """A search running when its process died, and one queued whose launch died with it, both
    run to the end after the embedded server's start-up sweep; the running one resumes."""
    TargetEvaluator.calls = 0
    base = _family(flow_env)
    running = _cma_policy(flow_env, base, name="was-running", evaluations=4)
    queued = _cma_policy(flow_env, base, name="was-queued", evaluations=2)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with flow_env.session() as session:
        row, _ = search_runs.start_search(session=session, policy_id=running)
        dead = f"{socket.gethostname()}:{gone.pid}:x"
        assert search_leases.claim_search(session=session, search_id=row.id or 0, owner=dead,
                                          lease_s=600)  # fmt: skip
        search_leases.save_progress(session=session, search_id=row.id or 0, owner=dead,
                                    lease_s=600, progress={"evaluations": 0})  # fmt: skip
        other, _ = search_runs.start_search(session=session, policy_id=queued)
    launcher = EmbeddedLauncher(flow_env.settings, cron=False).start()
    try:
        assert launcher.wait_idle(timeout=120), launcher.errors
    finally:
        launcher.stop()
    with flow_env.session() as session:
        for search_id, budget in ((row.id or 0, 4), (other.id or 0, 2)):
            done = search_runs.get_search(session=session, search_id=search_id)
            assert done.status == "finished" and done.evaluations == budget, done
    assert TargetEvaluator.calls == 6
