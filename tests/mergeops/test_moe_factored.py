"""Sub-MoE's factored form: stored as factor pairs (fewer bytes, not a from_pretrained folder),
and ``materialize`` gives exactly the dense sub_moe result back, loadable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergeops.moe.compress import compress_moe
from mergeops.moe.experts import MoeError
from mergeops.moe.factored import MANIFEST, materialize
from mergeops.moe.layout import detect_moe
from mergeops.moe.stats import safetensors_shapes
from tests.mergeops import moe_tiny


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_factored_sub_moe_materializes_to_the_dense_result(tmp_path: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM

    model = moe_tiny.mixtral(3) if family == "mixtral" else moe_tiny.qwen2_moe(3)
    source = moe_tiny.save(model, tmp_path / "src")
    calibration = moe_tiny.calibration()
    dense = compress_moe(
        source, tmp_path / "dense", "sub_moe", 2, calibration, progress=False, rank=3
    )
    small = compress_moe(
        source, tmp_path / "fac", "sub_moe", 2, calibration, progress=False, rank=3, factored=True
    )
    assert small.groups == dense.groups and (tmp_path / "fac" / MANIFEST).is_file()
    assert small.bytes_after < dense.bytes_after
    shapes = safetensors_shapes(tmp_path / "fac")
    prefix = "model.layers.1.mlp.experts.1.down_proj"
    assert shapes[f"{prefix}.factor_a"] == [16, 3] and shapes[f"{prefix}.factor_b"][0] == 3
    layout = detect_moe(shapes)
    assert layout is not None and layout.experts_per_layer == {0: 2, 1: 2}
    with pytest.raises((OSError, ValueError)):  # no config.json: from_pretrained refuses it
        AutoModelForCausalLM.from_pretrained(tmp_path / "fac")

    materialize(tmp_path / "fac", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    want = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(back(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-4)
    for name, tensor in want.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=1e-5, rtol=1e-4)


def test_factored_needs_sub_moe_with_a_rank_and_is_not_compressed_again(tmp_path: Path) -> None:
    source = moe_tiny.save(moe_tiny.mixtral(3), tmp_path / "src")
    calibration = moe_tiny.calibration()
    with pytest.raises(MoeError, match="factored=True needs method 'sub_moe' and a rank"):
        compress_moe(
            source, tmp_path / "x", "sub_moe", 2, calibration, progress=False, factored=True
        )
    assert not (tmp_path / "x").exists()
    compress_moe(
        source, tmp_path / "fac", "sub_moe", 2, calibration, progress=False, rank=2, factored=True
    )
    with pytest.raises(MoeError, match="holds factored experts; materialize it first"):
        compress_moe(tmp_path / "fac", tmp_path / "y", "average", 1, calibration, progress=False)
    with pytest.raises(MoeError, match="not a factored MoE folder"):
        materialize(source, tmp_path / "z")
    with safe_open(str(tmp_path / "fac" / "model.safetensors"), "pt") as handle:
        assert not any(".experts.gate_up_proj" in k for k in handle.keys())  # noqa: SIM118
