"""MoE layout detection on real transformers tensor names, and tensor-wise merges of MoE files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeops.moe.layout import detect_moe, is_moe_config
from tests.mergeops import moe_tiny


def _disk_shapes(directory: Path) -> dict[str, list[int]]:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return {k: list(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118


def test_mixtral_files_and_fused_memory_layout(tmp_path: Path) -> None:
    model = moe_tiny.mixtral()
    shapes = _disk_shapes(moe_tiny.save(model, tmp_path / "mixtral"))
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    layout = detect_moe(shapes, config=config)
    assert layout is not None and is_moe_config(config)
    assert layout.architecture == "mixtral" and layout.experts_per_layer == {0: 4, 1: 4}
    layer = layout.layers[0]
    assert layer.router_weight == "model.layers.0.block_sparse_moe.gate.weight"
    assert layer.expert_tensors[3] == tuple(
        f"model.layers.0.block_sparse_moe.experts.3.{p}.weight" for p in ("w1", "w2", "w3")
    )
    assert layout.summary()["experts_per_token"] == 2
    # transformers 5 fuses experts in memory: (E, 2I, H) and (E, H, I) tensors, router under mlp
    memory = {k: list(v.shape) for k, v in model.state_dict().items()}
    fused = detect_moe(memory)
    assert fused is not None and fused.experts_per_layer == {0: 4, 1: 4}
    assert fused.layers[1].fused_tensors == (
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.gate_up_proj",
    )
    assert fused.layers[1].router_weight == "model.layers.1.mlp.gate.weight"


def test_qwen2_moe_shared_expert_and_deepseek_names(tmp_path: Path) -> None:
    shapes = _disk_shapes(moe_tiny.save(moe_tiny.qwen2_moe(), tmp_path / "qwen"))
    layout = detect_moe(shapes)
    assert layout is not None and layout.architecture == "qwen2_moe"
    layer = layout.layers[0]
    assert layer.num_experts == 4 and len(layer.expert_tensors[0]) == 3
    assert "model.layers.0.mlp.shared_expert_gate.weight" in layer.shared_tensors
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in layer.shared_tensors
    roles = layout.tensor_roles()
    assert roles["model.layers.0.mlp.experts.2.down_proj.weight"] == {
        "layer": 0,
        "role": "expert",
        "expert": 2,
    }
    assert roles["model.layers.1.mlp.gate.weight"] == {"layer": 1, "role": "router"}
    deepseek = [
        "model.layers.0.mlp.gate_proj.weight",  # first dense layer
        *(f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(8)),
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
    ]
    found = detect_moe(deepseek)
    assert found is not None and found.architecture == "deepseek"
    assert found.experts_per_layer == {1: 8} and len(found.layers[0].router) == 2
    assert found.summary()["layers_with_shared_experts"] == 1


def test_dense_model_and_missing_router(tmp_path: Path) -> None:
    dense = _disk_shapes(moe_tiny.save(moe_tiny.llama(), tmp_path / "llama"))
    assert detect_moe(dense) is None
    names = [f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight" for e in range(4)]
    layout = detect_moe(names)
    assert layout is not None and layout.summary()["routers_missing"] == [0]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_tensorwise_methods_merge_mixtral_finetunes(tmp_path: Path, method: str) -> None:
    """Experts are matched by index: the merge of two fine-tunes loads and merges expert 3 alone."""
    from transformers import AutoModelForCausalLM

    import mergeops

    base = moe_tiny.mixtral(0)
    dirs = [moe_tiny.save(base, tmp_path / "base")]
    dirs += [moe_tiny.save(moe_tiny.nudged(base, s), tmp_path / f"ft{s}") for s in (1, 2)]
    out = tmp_path / "merged"
    params = {"weight": 1.0} if method == "task_arithmetic" else {"weight": 1.0, "density": 1.0}
    mergeops.merge_files(
        method,
        [str(d / "model.safetensors") for d in dirs[1:]],
        base=str(dirs[0] / "model.safetensors"),
        out_dir=out,
        params=params,
        model_names=["ft1", "ft2"],
        progress=False,
    )
    shutil.copy(dirs[0] / "config.json", out / "config.json")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert detect_moe(_disk_shapes_any(out)) is not None
    name = "model.layers.1.mlp.experts.gate_up_proj"
    tensors = [dict(AutoModelForCausalLM.from_pretrained(d).named_parameters())[name] for d in dirs]
    got = dict(merged.named_parameters())[name]
    if method == "task_arithmetic":
        expected = tensors[0] + (tensors[1] - tensors[0]) + (tensors[2] - tensors[0])
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.equal(got[3], got[2])
    logits = merged(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()


def _disk_shapes_any(directory: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            shapes.update({k: list(handle.get_slice(k).get_shape()) for k in handle.keys()})  # noqa: SIM118
    return shapes
