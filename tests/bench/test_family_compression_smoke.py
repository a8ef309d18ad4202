"""Smoke test of ``bench.family_compression`` on a tiny two-task zoo: the figures add up and
the report prints both tables and a verdict."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.family_compression import main, report, run
from bench.zoo.train import TrainConfig

TINY = TrainConfig(
    hidden=32, features=16, pretrain_epochs=5, finetune_epochs=3, trajectory_points=2,
    fisher_examples=64,
)  # fmt: skip


def test_family_figures_on_a_tiny_zoo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zoo = tmp_path / "zoo"
    figures = run(zoo, tasks=("rot90", "parity"), build_options={"irrelevant": 0, "config": TINY})
    assert [t.task for t in figures.tasks] == ["rot90", "parity"]
    raw_models = sum(
        (zoo / f"tasks/{t}/model.safetensors").stat().st_size for t in ("rot90", "parity")
    )
    assert figures.original_bytes == raw_models
    # τ_MTL is one model's worth of float32; each packed mask is ~1/32 of a model
    assert figures.merged_bytes < raw_models / 2 + 1024
    assert 0 < figures.mask_zstd_bytes <= figures.mask_bytes < figures.merged_bytes
    assert figures.ratio == pytest.approx(raw_models / figures.family_bytes)
    for task in figures.tasks:
        assert task.lam in (0.2, 0.3, 0.4, 0.5, 0.6)
        assert 0.0 < task.density <= 1.0
        assert task.val_rebuilt <= task.val_original + 1.0
        assert task.retention == pytest.approx(task.test_rebuilt / task.test_original)
    report(figures)
    out = capsys.readouterr().out
    assert "x smaller" in out and ("goal MET" in out or "goal NOT MET" in out)
    again = main(["--zoo", str(zoo), "--tasks", "parity,rot90"])
    assert [t.task for t in again.tasks] == ["parity", "rot90"]
