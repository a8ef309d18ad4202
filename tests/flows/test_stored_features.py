"""Alignment merges from stored ``features`` artifacts (no evaluator probe): captured on the
client, checked on upload, handed to ot_fusion/pleas by the merge and search flows; a permuted
copy of a model aligns back onto it exactly. Missing features and pleas's least-squares step
are 422 at ``POST /merges`` (a failed search for a search), inputs of different architectures
a failed run naming the tensor; nothing is registered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from flows import runtime as flow_runtime
from flows.inputs import checkpoint_dir
from mergeops.io import open_source
from registry.client.capture_features import FeatureLayer, capture_features
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import Embedded

LAYERS = [FeatureLayer("hidden", module="act", weight="fc1.weight", bias="fc1.bias",
                       cols=("fc2.weight",))]  # fmt: skip


class Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _models() -> tuple[Mlp, Mlp]:
    """A model and a copy with its hidden neurons permuted (the same function)."""
    torch.manual_seed(0)
    a, b = Mlp(), Mlp()
    perm = torch.randperm(8)
    with torch.no_grad():
        b.fc1.weight.copy_(a.fc1.weight[perm])
        b.fc1.bias.copy_(a.fc1.bias[perm])
        b.fc2.weight.copy_(a.fc2.weight[:, perm])
        b.fc2.bias.copy_(a.fc2.bias)
    return a, b


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _features(api: Embedded, checkpoint_id: int, model: Mlp, tmp: Path) -> Any:
    torch.manual_seed(1)
    batches = [torch.randn(16, 4) for _ in range(4)]  # the same inputs for every model
    path = capture_features(model, batches, LAYERS, tmp / f"features-{checkpoint_id}.safetensors")
    return _post(api, checkpoint_id, path)


def _post(api: Embedded, checkpoint_id: int, path: Path) -> Any:
    return api.client.post(f"/api/v1/checkpoints/{checkpoint_id}/artifacts",
                           params={"role": "features"}, headers=api.headers,
                           content=path.read_bytes())  # fmt: skip


def _run(api: Embedded, method: str, ids: list[int], **params: Any) -> dict[str, Any]:
    started = api.post_merge(method, ids, params=params)
    assert started.status_code == 202, started.text
    run_id = started.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        run = api.client.get(f"/api/v1/merges/{run_id}").json()
        if run["status"] in ("succeeded", "failed"):
            return run
        time.sleep(0.1)
    raise AssertionError(f"merge run {run_id} never ended")


def _merged(api: Embedded, run: dict[str, Any], tmp: Path) -> dict[str, torch.Tensor]:
    runtime = flow_runtime.current_runtime()
    with runtime.session() as session:
        folder = checkpoint_dir(session=session, store=runtime.store,
                                checkpoint_id=run["output_checkpoint_id"], cache_dir=tmp / "dl")  # fmt: skip
    source = open_source(folder)
    return {k: source.get(k).float() for k in list(source.keys())}


@pytest.mark.parametrize(
    ("method", "params"), [("ot_fusion", {}), ("pleas", {"least_squares": False})]
)
def test_stored_features_align_a_permuted_copy_back(
    embedded: Embedded, tmp_path: Path, method: str, params: dict[str, Any]
) -> None:
    a, b = _models()
    ida = embedded.upload("mlp-a", _state(a))["id"]
    idb = embedded.upload("mlp-b", _state(b))["id"]
    for checkpoint_id, model in ((ida, a), (idb, b)):
        stored = _features(embedded, checkpoint_id, model, tmp_path)
        assert stored.status_code == 201, stored.text
        assert stored.json()["role"] == "features"
    run = _run(embedded, method, [ida, idb], **params)
    assert run["status"] == "succeeded", run.get("error")
    merged = _merged(embedded, run, tmp_path)
    for key, value in _state(a).items():  # the average of a and b aligned onto a is a
        assert torch.allclose(merged[key], value, atol=1e-5), key
    plain = _run(embedded, "linear", [ida, idb])  # unaligned: far from a
    assert not torch.allclose(_merged(embedded, plain, tmp_path)["fc1.weight"], a.fc1.weight)


def test_missing_features_and_least_squares_are_refused_naming_the_cause(
    embedded: Embedded, tmp_path: Path
) -> None:
    a, b = _models()
    ida = embedded.upload("mlp-a", _state(a))["id"]
    idb = embedded.upload("mlp-b", _state(b))["id"]
    assert _features(embedded, ida, a, tmp_path).status_code == 201
    refused = embedded.post_merge("ot_fusion", [ida, idb])
    assert refused.status_code == 422, refused.text
    assert f"checkpoint {idb} 'mlp-b' has no 'features' artifact" in refused.text
    assert _features(embedded, idb, b, tmp_path).status_code == 201
    solved = embedded.post_merge("pleas", [ida, idb])
    assert solved.status_code == 422 and "least_squares to false" in solved.text
    assert embedded.client.get("/api/v1/merges").json()["total"] == 0  # nothing created
    wide = Mlp()
    wide.fc1, wide.fc2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)
    idw = embedded.upload("mlp-narrow", _state(wide))["id"]
    assert _features(embedded, idw, wide, tmp_path).status_code == 201
    mixed = _run(embedded, "ot_fusion", [ida, idw])
    assert mixed["status"] == "failed" and mixed["output_checkpoint_id"] is None
    assert "shape mismatch for 'fc1" in mixed["error"], mixed["error"]
    assert _merged_names(embedded) == []  # nothing half-registered


def _merged_names(api: Embedded) -> list[str]:
    found = api.client.get("/api/v1/checkpoints", params={"kind": "merged"}).json()
    return [c["name"] for c in found["items"]]


def test_features_that_do_not_fit_the_weights_are_refused(
    embedded: Embedded, tmp_path: Path
) -> None:
    a, _ = _models()
    ida = embedded.upload("mlp-a", _state(a))["id"]
    bad = [FeatureLayer("hidden", module="fc2", weight="fc1.weight")]  # 3 wide, fc1 has 8
    path = capture_features(a, [torch.randn(4, 4)], bad, tmp_path / "bad.safetensors")
    refused = _post(embedded, ida, path)
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert detail["tensor"] == "hidden" and "expected (samples, 8)" in detail["message"]
    unknown = [FeatureLayer("hidden", module="act", weight="fc9.weight")]
    path = capture_features(a, [torch.randn(4, 4)], unknown, tmp_path / "unknown.safetensors")
    refused = _post(embedded, ida, path)
    assert refused.status_code == 422 and "'fc9.weight' is not a weight" in refused.text
    listed = embedded.client.get(f"/api/v1/checkpoints/{ida}/artifacts").json()
    assert listed == []


def test_a_search_over_ot_fusion_uses_stored_features(embedded: Embedded, tmp_path: Path) -> None:
    """The search flow hands ot_fusion the stored features when the evaluator has no probe;
    without them the search fails naming the checkpoint."""
    a, b = _models()
    ida = embedded.upload("mlp-a", _state(a), task="a")["id"]
    idb = embedded.upload("mlp-b", _state(b), task="b")["id"]
    assert _features(embedded, ida, a, tmp_path).status_code == 201
    search = {"algorithm": "cma_es", "budget": {"evaluations": 3}, "space": {"reg": [0.01, 0.5]},
              "metric": "l2_norm"}  # fmt: skip
    policy = embedded.client.post("/api/v1/policies", headers=embedded.headers, json={
        "name": "align-search", "method": "ot_fusion", "params": {"solver": "sinkhorn"},
        "selector": {"tasks": ["a", "b"]}, "evaluator": "ckreg-test-norm", "search": search,
    }).json()["id"]  # fmt: skip
    url = f"/api/v1/policies/{policy}/searches"
    first = embedded.client.post(url, headers=embedded.headers).json()
    failed = _wait_search(embedded, first["id"])
    assert failed["status"] == "failed", failed
    assert f"checkpoint {idb} 'mlp-b' has no 'features' artifact" in failed["error"]
    assert _features(embedded, idb, b, tmp_path).status_code == 201
    again = embedded.client.post(url, headers=embedded.headers).json()
    assert again["id"] == first["id"] and again["resumed"] is True
    done = _wait_search(embedded, first["id"])
    assert done["status"] == "finished" and done["evaluations"] == 3, done


def _wait_search(api: Embedded, search_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = api.client.get(f"/api/v1/searches/{search_id}").json()
        if found["status"] in ("finished", "failed", "cancelled"):
            return found
        time.sleep(0.1)
    raise AssertionError(f"search {search_id} never ended")
