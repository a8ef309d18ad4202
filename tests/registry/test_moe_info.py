"""GET /checkpoints/{id} says how many experts an MoE checkpoint has per layer."""

from __future__ import annotations

from pathlib import Path

from tests.mergeops import moe_tiny
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api


def test_registered_mixtral_reports_experts(api: Api, tmp_path: Path) -> None:
    folder = moe_tiny.save(moe_tiny.qwen2_moe(experts=4), tmp_path / "qwen")
    body = api.register(
        {"model.safetensors": (folder / "model.safetensors").read_bytes()}, name="qwen-moe"
    )
    shown = api.client.get(f"/api/v1/checkpoints/{body['id']}").json()
    moe = shown["metadata"]["moe"]
    assert moe["experts_per_layer"] == 4 and moe["moe_layers"] == 2
    assert moe["layers_with_shared_experts"] == 2 and moe["routers_missing"] == []


def test_tensor_index_knows_router_expert_and_shared_tensors(api: Api, tmp_path: Path) -> None:
    from registry.services.moe_info import moe_tensor_roles

    folder = moe_tiny.save(moe_tiny.qwen2_moe(experts=4), tmp_path / "qwen")
    body = api.register(
        {"model.safetensors": (folder / "model.safetensors").read_bytes()}, name="qwen-moe"
    )
    with api.env.session() as session:
        roles = moe_tensor_roles(session, body["id"])
    assert roles["model.layers.1.mlp.gate.weight"] == {"layer": 1, "role": "router"}
    assert roles["model.layers.0.mlp.shared_expert_gate.weight"]["role"] == "shared"
    experts = {n: r for n, r in roles.items() if r["role"] in ("expert", "experts")}
    assert {r["layer"] for r in experts.values()} == {0, 1}
    assert "model.embed_tokens.weight" not in roles
    counts = body["metadata"]["moe"]["tensors_by_role"]
    assert counts["router"] == 2 and counts["expert"] + counts.get("experts", 0) == len(experts)
    # the range reader still accepts the index entries with the added role
    (row,) = [a for a in api.env.artifact_rows(body["id"]) if a.name == "model.safetensors"]
    entry = row.tensor_index["model.layers.1.mlp.gate.weight"]
    assert set(entry) == {"dtype", "shape", "start", "end", "moe"}


def test_dense_checkpoint_has_no_moe_metadata(api: Api, tmp_path: Path) -> None:
    folder = moe_tiny.save(moe_tiny.llama(), tmp_path / "llama")
    body = api.register(
        {"model.safetensors": (folder / "model.safetensors").read_bytes()}, name="d"
    )
    assert "moe" not in api.client.get(f"/api/v1/checkpoints/{body['id']}").json()["metadata"]


def test_moe_built_from_registered_experts_links_them(api: Api, tmp_path: Path) -> None:
    dense = moe_tiny.save(moe_tiny.llama(), tmp_path / "llama")
    data = (dense / "model.safetensors").read_bytes()
    experts = [
        api.register({"model.safetensors": data}, name=f"expert-{i}")["id"] for i in range(2)
    ]
    moe = moe_tiny.save(moe_tiny.mixtral(experts=2, per_token=1), tmp_path / "moe")
    files = {"model.safetensors": (moe / "model.safetensors").read_bytes()}
    body = api.register(files, name="moe", kind="merged", metadata={"moe_experts": experts})
    lineage = api.client.get(f"/api/v1/checkpoints/{body['id']}/lineage").json()
    parents = sorted(e["parent_id"] for e in lineage["ancestors"] if e["role"] == "input")
    assert parents == sorted(experts)
    assert body["metadata"]["moe"]["experts_per_layer"] == 2


def test_unknown_expert_id_fails_the_checkpoint(api: Api, tmp_path: Path) -> None:
    moe = moe_tiny.save(moe_tiny.mixtral(experts=2, per_token=1), tmp_path / "moe")
    files = {"model.safetensors": (moe / "model.safetensors").read_bytes()}
    created = api.register(
        files, name="moe", kind="merged", metadata={"moe_experts": [999]}, complete=False
    )
    url = f"/api/v1/checkpoints/{created['id']}"
    done = api.client.post(f"{url}/complete", json={}, headers=api.headers)
    assert done.status_code == 422 and "parent checkpoint 999 is missing" in done.text
    shown = api.client.get(url).json()
    assert shown["status"] == "failed" and shown["files"] == []
