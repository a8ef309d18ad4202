"""bench.frontier_bench at the tiny shape: synthetic Grams, the regmean and adamerging merges
(in process, as each measured child runs them) and the gram-capture timing."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from bench._synth import SHAPES, write_family
from bench.frontier_bench import LlamaEntropy, capture_rows, child, write_grams


def test_grams_fit_every_linear_weight(tmp_path: Path) -> None:
    shape = SHAPES["tiny"]
    (path,) = write_grams(tmp_path, shape, 1)
    grams = load_file(str(path))
    dims = dict(shape.tensor_shapes())
    assert "model.embed_tokens.weight" not in grams and "lm_head.weight" in grams
    for key, gram in grams.items():
        assert gram.shape == (dims[key][1],) * 2
        assert torch.linalg.eigvalsh(gram).min() >= 0.09  # PSD plus 0.1·I


def test_regmean_and_adamerging_merges_write_models(tmp_path: Path) -> None:
    shape = SHAPES["tiny"]
    write_family(tmp_path / "tiny", shape=shape, finetunes=2)
    for method in ("regmean", "adamerging"):
        child(method, tmp_path / "tiny", "tiny", 2, 2)
        merged = {}
        for part in (tmp_path / "tiny" / f"out-{method}").glob("*.safetensors"):
            merged |= load_file(str(part))
        assert set(merged) == {name for name, _ in shape.tensor_shapes()}, method
        assert all(torch.isfinite(t.float()).all() for t in merged.values())


def test_entropy_objective_has_gradients() -> None:
    shape = SHAPES["tiny"]
    objective = LlamaEntropy(shape)
    params = {n: (0.02 * torch.randn(s)).requires_grad_(True) for n, s in shape.tensor_shapes()}
    loss = objective.loss(params)
    loss.backward()
    assert 0 < float(loss.detach()) <= float(torch.log(torch.tensor(float(shape.vocab)))) + 1e-4
    assert params["model.layers.0.mlp.up_proj.weight"].grad.abs().sum() > 0


def test_capture_rows_report_overhead() -> None:
    rows = capture_rows(steps=1, repeats=1)
    assert [r["recorder"] for r in rows] == ["none", "every=10", "every=1"]
    assert rows[0]["overhead_pct"] == 0.0 and all(r["s_per_step"] > 0 for r in rows)
    assert rows[0]["cpu_overhead_pct"] == 0.0 and all(r["cpu_s_per_step"] > 0 for r in rows)


def test_adamerging_holding_bfloat16_writes_the_model(tmp_path: Path) -> None:
    shape = SHAPES["tiny"]
    write_family(tmp_path / "tiny", shape=shape, finetunes=2)
    child("adamerging", tmp_path / "tiny", "tiny", 2, 2, "bfloat16")
    merged = {}
    for part in (tmp_path / "tiny" / "out-adamerging").glob("*.safetensors"):
        merged |= load_file(str(part))
    assert set(merged) == {name for name, _ in shape.tensor_shapes()}
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
