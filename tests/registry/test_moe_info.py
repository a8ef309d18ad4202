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


def test_dense_checkpoint_has_no_moe_metadata(api: Api, tmp_path: Path) -> None:
    folder = moe_tiny.save(moe_tiny.llama(), tmp_path / "llama")
    body = api.register(
        {"model.safetensors": (folder / "model.safetensors").read_bytes()}, name="d"
    )
    assert "moe" not in api.client.get(f"/api/v1/checkpoints/{body['id']}").json()["metadata"]
