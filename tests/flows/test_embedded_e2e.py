"""Embedded mode end to end: REST register -> automatic merge -> lineage and metrics.

Nothing but this process runs: the registry app (TestClient) and its embedded launcher.
"""

from __future__ import annotations

from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded, tiny_state


def test_rest_register_yields_merged_evaluated_checkpoint(embedded: Embedded) -> None:
    api, headers = embedded.client, embedded.headers
    base = embedded.upload("base", tiny_state(0), kind="base")
    policy = api.post(
        "/api/v1/policies",
        json={
            "name": "ties-newest",
            "method": "ties",
            "params": {"density": 0.5},
            "selector": {"base_id": base["id"]},
            "trigger": "on_register",
            "evaluator": "ckreg-test-norm",
        },
        headers=headers,
    )
    assert policy.status_code == 201, policy.text
    ft_a = embedded.upload("ft-a", tiny_state(1), base_id=base["id"], task="a")
    ft_b = embedded.upload("ft-b", tiny_state(2), base_id=base["id"], task="b")
    assert embedded.launcher.wait_idle(60), embedded.launcher.errors
    assert embedded.launcher.errors == []

    runs = api.get("/api/v1/merges", params={"status": "succeeded"}).json()
    assert runs["total"] == 1, api.get("/api/v1/merges").json()
    run = runs["items"][0]
    assert run["policy_id"] == policy.json()["id"]
    assert [i["checkpoint_id"] for i in run["inputs"]] == [ft_a["id"], ft_b["id"]]
    output_id = run["output_checkpoint_id"]

    merged = api.get(f"/api/v1/checkpoints/{output_id}").json()
    assert merged["kind"] == "merged" and merged["status"] == "ready"
    lineage = api.get(f"/api/v1/checkpoints/{output_id}/lineage").json()
    direct = {(e["parent_id"], e["role"]) for e in lineage["ancestors"] if e["depth"] == 1}
    assert direct == {(base["id"], "base"), (ft_a["id"], "input"), (ft_b["id"], "input")}
    metrics = api.get(f"/api/v1/checkpoints/{output_id}/metrics").json()
    assert {m["name"] for m in metrics} == {"l2_norm", "mean_abs"}
    assert {m["source"] for m in metrics} == {"evaluation"}

    # MLflow is down in these tests: the merge succeeded and its event waits in the outbox.
    from flows.tracking import tracker_from_settings

    embedded.launcher.runtime.background.submit(lambda: None).result(timeout=60)
    assert tracker_from_settings(embedded.env.settings).pending >= 1

    # The same inputs + method + params over POST /merges return the existing run.
    again = embedded.post_merge(
        "ties", [ft_a["id"], ft_b["id"]], params={"density": 0.5}, base_id=base["id"]
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == run["id"] and again.json()["reused"] is True


def test_post_merges_starts_adhoc_run(embedded: Embedded) -> None:
    api, headers = embedded.client, embedded.headers
    base = embedded.upload("base", tiny_state(0), kind="base")
    ft_a = embedded.upload("ft-a", tiny_state(1), base_id=base["id"], task="a")
    ft_b = embedded.upload("ft-b", tiny_state(2), base_id=base["id"], task="b")
    started = api.post(
        "/api/v1/merges",
        json={
            "method": "linear",
            "inputs": [
                {"checkpoint_id": ft_a["id"], "weight": 1.0},
                {"checkpoint_id": ft_b["id"], "weight": 3.0},
            ],
        },
        headers=headers,
    )
    assert started.status_code == 202, started.text
    assert embedded.launcher.wait_idle(60), embedded.launcher.errors
    run = api.get(f"/api/v1/merges/{started.json()['id']}").json()
    assert run["status"] == "succeeded", run["error"]
    assert run["output_checkpoint_id"] is not None

    bad = api.post(
        "/api/v1/merges",
        json={"method": "tiez", "inputs": [{"checkpoint_id": ft_a["id"]}]},
        headers=headers,
    )
    assert bad.status_code == 422 or bad.status_code == 400, bad.text
    assert "tiez" in bad.text and "available" in bad.text


def test_cron_policy_runs_on_schedule_in_embedded_mode(embedded: Embedded) -> None:
    from datetime import UTC, datetime, timedelta

    from flows.scheduler import CronScheduler

    api, headers = embedded.client, embedded.headers
    base = embedded.upload("base", tiny_state(0), kind="base")
    policy = api.post(
        "/api/v1/policies",
        json={
            "name": "hourly-fold",
            "method": "opcm",
            "selector": {"base_id": base["id"], "window": "all_since_last_fold"},
            "trigger": "cron",
            "cron": "0 * * * *",
        },
        headers=headers,
    )
    assert policy.status_code == 201, policy.text
    embedded.upload("a", tiny_state(1), base_id=base["id"], task="a")
    embedded.upload("b", tiny_state(2), base_id=base["id"], task="b")
    assert api.get("/api/v1/merges").json()["total"] == 0  # cron, not on_register
    # The launcher's scheduler, an hour and a bit later.
    scheduler = CronScheduler(embedded.launcher.runtime, embedded.launcher.policy_due)
    fired = scheduler.tick(now=datetime.now(UTC) + timedelta(hours=1, minutes=1))
    assert fired == [policy.json()["id"]]
    assert embedded.launcher.wait_idle(60), embedded.launcher.errors
    runs = api.get("/api/v1/merges").json()["items"]
    assert [r["status"] for r in runs] == ["succeeded"], runs
    artifacts = api.get(f"/api/v1/checkpoints/{runs[0]['output_checkpoint_id']}/artifacts").json()
    assert [a["role"] for a in artifacts if a["role"] == "merge_state"] == ["merge_state"]
