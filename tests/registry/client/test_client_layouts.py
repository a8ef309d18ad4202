"""Layout detection for ``Client.register``: single file, sharded, PEFT adapter, Trainer directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.client.layouts import LayoutError, plan_upload, read_trainer_state, sha256_file
from registry.safetensors_check import HeaderError


def weights(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"layer.weight": torch.randn(3, 2), "layer.bias": torch.randn(3)}, str(path))
    return path


def sharded(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": torch.ones(2, 2)}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.ones(2)}, str(directory / "model-00002-of-00002.safetensors"))
    index = {
        "metadata": {"total_size": 24},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        },
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text("{}")
    return directory


def trainer_dir(directory: Path) -> Path:
    weights(directory / "model.safetensors")
    state = {
        "global_step": 500,
        "log_history": [
            {"loss": 1.5, "step": 250},
            {"loss": 0.42, "step": 500},
            {"eval_loss": 0.6, "step": 500},
        ],
    }
    (directory / "trainer_state.json").write_text(json.dumps(state))
    torch.save({"state": {}, "param_groups": []}, directory / "optimizer.pt")
    return directory


def test_single_file(tmp_path: Path) -> None:
    plan = plan_upload(weights(tmp_path / "ft.safetensors"))
    assert (plan.layout, plan.name, plan.kind, plan.step) == ("file", "ft", "finetune", None)
    assert [p.name for p in plan.files] == ["ft.safetensors"]


def test_directory_single(tmp_path: Path) -> None:
    weights(tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text("{}")
    plan = plan_upload(tmp_path / "m")
    assert plan.layout == "single"
    assert [p.name for p in plan.files] == ["model.safetensors", "config.json"]


def test_sharded(tmp_path: Path) -> None:
    plan = plan_upload(sharded(tmp_path / "big"))
    assert plan.layout == "sharded"
    assert [p.name for p in plan.files] == [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "config.json",
    ]


def test_sharded_missing_shard(tmp_path: Path) -> None:
    directory = sharded(tmp_path / "big")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HeaderError, match=r"'model-00002-of-00002\.safetensors' was not uploaded"):
        plan_upload(directory)


def test_adapter(tmp_path: Path) -> None:
    weights(tmp_path / "lora" / "adapter_model.safetensors")
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    plan = plan_upload(tmp_path / "lora")
    assert (plan.layout, plan.kind) == ("adapter", "adapter")
    assert [p.name for p in plan.files] == ["adapter_model.safetensors", "adapter_config.json"]


def test_trainer_checkpoint(tmp_path: Path) -> None:
    plan = plan_upload(trainer_dir(tmp_path / "checkpoint-500"))
    assert (plan.layout, plan.name, plan.step, plan.metrics) == (
        "trainer/single",
        "checkpoint-500",
        500,
        {"loss": 0.42},
    )
    assert plan.optimizer_file == tmp_path / "checkpoint-500" / "optimizer.pt"
    assert [p.name for p in plan.files] == ["model.safetensors"]


def test_trainer_state_without_losses(tmp_path: Path) -> None:
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": []}))
    assert read_trainer_state(tmp_path / "trainer_state.json") == (3, {})


def test_rejects_unknown_layouts(tmp_path: Path) -> None:
    (tmp_path / "model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LayoutError, match=r"not a \.safetensors file"):
        plan_upload(tmp_path / "model.bin")
    with pytest.raises(LayoutError, match="no weights found"):
        plan_upload(tmp_path)
    with pytest.raises(LayoutError, match="does not exist"):
        plan_upload(tmp_path / "nope")


def test_rejects_corrupt_weights_before_upload(tmp_path: Path) -> None:
    path = weights(tmp_path / "ft.safetensors")
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(HeaderError, match="4 trailing bytes"):
        plan_upload(path)


def test_sha256_file(tmp_path: Path) -> None:
    import hashlib

    (tmp_path / "x").write_bytes(b"a" * (3 << 20))
    assert sha256_file(tmp_path / "x") == hashlib.sha256(b"a" * (3 << 20)).hexdigest()
