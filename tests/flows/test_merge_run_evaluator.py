"""Ad-hoc merges (``POST /merges``) are scored with the evaluator given in the request."""

from __future__ import annotations

from typing import Any

from registry.models import MergeRun
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded, tiny_state


def _post_linear(embedded: Embedded, **extra: Any) -> Any:
    """Upload two fine-tunes and ``POST /merges`` a linear merge of them."""
    ft_a = embedded.upload("ft-a", tiny_state(1))
    ft_b = embedded.upload("ft-b", tiny_state(2))
    return embedded.post_merge("linear", [ft_a["id"], ft_b["id"]], **extra)


def test_post_merges_with_evaluator_stores_evaluation_metrics(embedded: Embedded) -> None:
    api = embedded.client
    base = embedded.upload("base", tiny_state(0), kind="base")
    ft_a = embedded.upload("ft-a", tiny_state(1), base_id=base["id"], task="a")
    ft_b = embedded.upload("ft-b", tiny_state(2), base_id=base["id"], task="b")
    ties = {"params": {"density": 0.5}, "base_id": base["id"]}
    started = embedded.post_merge(
        "ties", [ft_a["id"], ft_b["id"]], **ties, evaluator="ckreg-test-norm"
    )
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    assert started.json()["policy_id"] is None
    assert started.json()["evaluator"] == "ckreg-test-norm"
    with embedded.env.session() as session:
        stored = session.get(MergeRun, run_id)
        assert stored is not None and stored.evaluator == "ckreg-test-norm"

    assert embedded.launcher.wait_idle(60), embedded.launcher.errors
    assert embedded.launcher.errors == []
    run = api.get(f"/api/v1/merges/{run_id}").json()
    assert run["status"] == "succeeded", run["error"]
    metrics = api.get(f"/api/v1/checkpoints/{run['output_checkpoint_id']}/metrics").json()
    assert {m["name"] for m in metrics} == {"l2_norm", "mean_abs"}
    assert {m["source"] for m in metrics} == {"evaluation"}
    assert {m["dataset"] for m in metrics} == {"ckreg-test-norm"}
    assert run["evaluator"] == "ckreg-test-norm"

    # The evaluator is not part of the idempotency key: the same merge without one is this run.
    again = embedded.post_merge("ties", [ft_a["id"], ft_b["id"]], **ties)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == run_id and again.json()["reused"] is True
    assert again.json()["evaluator"] == "ckreg-test-norm"


def test_post_merges_with_unknown_evaluator_is_refused_up_front(embedded: Embedded) -> None:
    api = embedded.client
    refused = _post_linear(embedded, evaluator="ckreg-test-nrom")
    assert refused.status_code == 422, refused.text
    detail = str(refused.json()["detail"])
    assert "unknown evaluator 'ckreg-test-nrom'" in detail
    assert "available:" in detail and "ckreg-test-norm" in detail
    assert api.get("/api/v1/merges").json()["total"] == 0


def test_post_merges_without_evaluator_stores_no_metrics(embedded: Embedded) -> None:
    api = embedded.client
    started = _post_linear(embedded)
    assert started.status_code == 202, started.text
    assert embedded.launcher.wait_idle(60), embedded.launcher.errors
    run = api.get(f"/api/v1/merges/{started.json()['id']}").json()
    assert run["status"] == "succeeded", run["error"]
    assert run["evaluator"] is None
    metrics = api.get(f"/api/v1/checkpoints/{run['output_checkpoint_id']}/metrics").json()
    assert [m for m in metrics if m["source"] == "evaluation"] == []
