"""Smoke run of the merge-engine benchmark at tiny size, ckreg side only (mergekit is an
optional bench extra), plus the pieces it relies on: deterministic synthetic checkpoints
that mergekit's llama architecture accepts, and the streaming output comparison."""

import json
from pathlib import Path

import torch

from bench import merge_engine, merge_pipeline
from bench._synth import SHAPES, write_family
from mergeops.io import open_source


def test_synthetic_family_is_llama_shaped_sharded_and_deterministic(tmp_path: Path) -> None:
    shape = SHAPES["tiny"]
    first = write_family(tmp_path / "a", shape=shape, finetunes=2, shard_size="60KB")
    again = write_family(tmp_path / "b", shape=shape, finetunes=2, shard_size="60KB")
    base = first[0]
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == shape.layers
    names = set(open_source(base).keys())
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= names
    assert "model.layers.1.mlp.gate_proj.weight" in names
    for left, right in zip(first, again, strict=True):
        a, b = open_source(left), open_source(right)
        for key in a.keys():  # noqa: SIM118 (a TensorSource, not a dict)
            assert a.get(key).dtype == torch.bfloat16
            assert torch.equal(a.get(key), b.get(key)), key
    tau = (
        open_source(first[1]).get("lm_head.weight").float()
        - open_source(base).get("lm_head.weight").float()
    )
    assert 0 < float(tau.abs().mean()) < 0.01


def test_compare_reports_zero_for_identical_and_counts_differences(tmp_path: Path) -> None:
    folders = write_family(tmp_path / "m", shape=SHAPES["tiny"], finetunes=2, shard_size="60KB")
    same = merge_engine.compare(folders[0], folders[0], ties_inputs=None, density=0.5)
    assert (same.max_abs, same.mismatched) == (0.0, 0)
    other = merge_engine.compare(folders[0], folders[1], ties_inputs=None, density=0.5)
    assert other.max_abs > 0 and other.mismatched > 0


def test_tiny_benchmark_runs_ckreg_side_without_mergekit(tmp_path: Path, capsys) -> None:
    args = ["--sizes", "tiny", "--work", str(tmp_path), "--mergekit", "none"]
    code = merge_engine.main([*args, "--shard-size", "100KB"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "mergekit: skipped" in printed
    rows = [line for line in printed.splitlines() if line.strip().startswith("tiny ")]
    assert len(rows) >= 3 and all(" ckreg " in row for row in rows)
    assert "FAILED" not in printed
    assert "CUDA:" in printed
    assert not (tmp_path / "tiny" / "models").exists()  # cleaned up without --keep


def test_tiny_benchmark_compares_prefetch_off_and_on(tmp_path: Path, capsys) -> None:
    args = ["--sizes", "tiny", "--work", str(tmp_path), "--mergekit", "none"]
    code = merge_engine.main([*args, "--methods", "task_arithmetic", "--prefetch-compare"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    line = next(x for x in printed.splitlines() if x.startswith("prefetch tiny task_arithmetic"))
    assert " s off, " in line and "nan" not in line


def test_gpu_rows_run_every_method_config_on_cpu(tmp_path: Path) -> None:
    """The CUDA table's configs (ota_ffg second moments, opcm fresh state), parsing and
    formatting, run on the CPU here; bench/gpu_check.sh runs them on a GPU."""
    shape = SHAPES["tiny"]
    folders = write_family(tmp_path / "models", shape=shape, finetunes=2, shard_size="60KB")
    methods = ["ties", "task_arithmetic", "ota_ffg", "opcm"]
    rows = merge_pipeline.cuda_rows(tmp_path, folders, shape, methods, merge_engine.measure,
                                    device="cpu")  # fmt: skip
    assert [r.method for r in rows] == methods
    assert all(r.ok and r.merge_s > 0 for r in rows), [r.log.read_text() for r in rows]
    moments = sum(merge_pipeline.folder_bytes(tmp_path / "models" / f"v-{i}") for i in (1, 2))
    models = sum(merge_pipeline.folder_bytes(f) for f in folders)
    assert rows[2].moved > rows[1].moved and moments > 0 and rows[1].moved > models
    table = merge_pipeline.format_cuda(rows, h2d=25.0)
    assert "ota_ffg" in table and "FAILED" not in table and ">= 0.50" in table


def test_cuda_mode_without_cuda_says_so(capsys) -> None:
    if torch.cuda.is_available():
        return
    assert merge_engine.main(["--device", "cuda", "--sizes", "tiny"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().out


def test_latency_demo_runs_both_modes() -> None:
    rows = merge_pipeline.latency_demo(0.0, layers=1, rows=1024)
    assert [label for label, _ in rows] == ["prefetch off", "prefetch on"]
    assert all(wall > 0 for _, wall in rows)
