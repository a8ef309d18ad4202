"""compress_moe: N experts -> M per layer on tiny Mixtral / Qwen2-MoE models, loadable; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeops.moe.compress import compress_moe
from mergeops.moe.experts import MoeError
from mergeops.moe.layout import detect_moe
from mergeops.moe.stats import safetensors_shapes
from tests.mergeops import moe_tiny


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moe_tiny.save(moe_tiny.mixtral(3), tmp_path_factory.mktemp("m") / "mixtral")


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("mc_smoe", {}),
        ("mc_smoe", {"low_rank": 4}),
        ("mc_smoe", {"leaders": "diverse"}),
        ("sub_moe", {"rank": 8}),
        ("average", {}),
    ],
)
def test_halving_experts_loads_with_transformers(
    mixtral_dir: Path, tmp_path: Path, method: str, options: dict
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = compress_moe(
        mixtral_dir, out, method, 2, moe_tiny.calibration(), progress=False, **options
    )  # type: ignore[arg-type]
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    layout = detect_moe(safetensors_shapes(out))
    assert layout is not None and layout.experts_per_layer == {0: 2, 1: 2}
    assert all(
        sorted(e for group in g for e in group) == [0, 1, 2, 3] for g in result.groups.values()
    )
    assert result.bytes_after < result.bytes_before
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_local_experts == 2
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        router = handle.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    original = AutoModelForCausalLM.from_pretrained(mixtral_dir).state_dict()[
        "model.layers.0.mlp.gate.weight"
    ]
    if method != "average":  # the leaders' router rows are kept as they were
        leaders = [g[0] for g in result.groups[0]]
        torch.testing.assert_close(router, original[leaders])


def test_qwen2_moe_keeps_shared_expert(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    source = moe_tiny.save(moe_tiny.qwen2_moe(1), tmp_path / "qwen")
    out = tmp_path / "out"
    compress_moe(source, out, "sub_moe", 2, moe_tiny.calibration(), progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts == 2
    before = AutoModelForCausalLM.from_pretrained(source).state_dict()
    name = "model.layers.1.mlp.shared_expert.up_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], before[name])


def test_bad_input_names_the_problem_and_writes_nothing(mixtral_dir: Path, tmp_path: Path) -> None:
    dense = moe_tiny.save(moe_tiny.llama(), tmp_path / "dense")
    out = tmp_path / "out"
    with pytest.raises(MoeError, match="dense model"):
        compress_moe(dense, out, "mc_smoe", 2, moe_tiny.calibration(), progress=False)
    with pytest.raises(MoeError, match=r"4 experts of layer 0 .* do not divide into num_experts=3"):
        compress_moe(mixtral_dir, out, "sub_moe", 3, moe_tiny.calibration(), progress=False)
    with pytest.raises(MoeError, match="fewer than the 2 experts each token uses"):
        compress_moe(mixtral_dir, out, "mc_smoe", 1, moe_tiny.calibration(), progress=False)
    no_router = tmp_path / "no-router"
    no_router.mkdir()
    (no_router / "config.json").write_text((mixtral_dir / "config.json").read_text())
    with safe_open(str(mixtral_dir / "model.safetensors"), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    del state["model.layers.1.block_sparse_moe.gate.weight"]
    from safetensors.torch import save_file

    save_file(state, str(no_router / "model.safetensors"))
    with pytest.raises(
        MoeError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.gate\.weight'"
    ):
        compress_moe(no_router, out, "mc_smoe", 2, moe_tiny.calibration(), progress=False)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_per_expert_files_read_like_fused_and_rewrite_renumbered(mixtral_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mergeops.moe.experts import read_experts, write_experts

    with safe_open(str(mixtral_dir / "model.safetensors"), "pt") as handle:
        disk = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    memory = dict(AutoModelForCausalLM.from_pretrained(mixtral_dir).state_dict())
    disk_layer = detect_moe({k: list(v.shape) for k, v in disk.items()}).layers[0]  # type: ignore[union-attr]
    memory_layer = detect_moe({k: list(v.shape) for k, v in memory.items()}).layers[0]  # type: ignore[union-attr]
    on_disk, in_memory = read_experts(disk, disk_layer), read_experts(memory, memory_layer)
    for a, b in zip(on_disk, in_memory, strict=True):
        for p in ("gate", "up", "down"):
            torch.testing.assert_close(a[p], b[p])
    router = {"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(2, 16)}
    write_experts(disk, disk_layer, [on_disk[3], on_disk[1]], router)
    prefix = "model.layers.0.block_sparse_moe"
    assert not any(k.startswith(f"{prefix}.experts.2.") for k in disk)
    torch.testing.assert_close(disk[f"{prefix}.experts.0.w3.weight"], on_disk[3]["up"])
    assert disk[f"{prefix}.gate.weight"].shape == (2, 16)


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path: Path) -> None:
    source = moe_tiny.save(moe_tiny.mixtral(5).to(torch.bfloat16), tmp_path / "bf16")
    out = tmp_path / "out"
    compress_moe(source, out, "mc_smoe", 2, moe_tiny.calibration(), progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert (
            handle.get_tensor("model.layers.0.block_sparse_moe.experts.1.w2.weight").dtype
            == torch.bfloat16
        )


def test_qwen3_moe_and_deepseek_v3_with_dense_first_layer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    qwen3 = moe_tiny.save(moe_tiny.qwen3_moe(2), tmp_path / "qwen3")
    compress_moe(qwen3, tmp_path / "q-out", "mc_smoe", 2, moe_tiny.calibration(), progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "q-out").config.num_experts == 2
    deepseek = moe_tiny.save(moe_tiny.deepseek_v3(2), tmp_path / "ds")
    layout = detect_moe(safetensors_shapes(deepseek))
    assert layout is not None and layout.experts_per_layer == {1: 4}
    result = compress_moe(
        deepseek, tmp_path / "ds-out", "sub_moe", 2, moe_tiny.calibration(), progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ds-out").eval()
    assert model.config.n_routed_experts == 2
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    leaders = [g[0] for g in result.groups[1]]
    torch.testing.assert_close(bias, torch.arange(4.0)[leaders] / 10)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_group_limited_routing_needs_whole_groups() -> None:
    from types import SimpleNamespace

    from mergeops.moe.compress import _check_groups

    _check_groups(SimpleNamespace(n_group=2), 4)
    with pytest.raises(MoeError, match="n_group=4"):
        _check_groups(SimpleNamespace(n_group=4), 4)
