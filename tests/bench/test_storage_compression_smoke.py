"""Smoke test of ``bench.storage_compression`` on a tiny zoo and the tiny Llama shape: sizes in
every form, the goals' verdict lines, and the API round trip with compression off and on."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.storage_compression import main
from bench.zoo import ensure_zoo
from bench.zoo.train import TrainConfig

TINY = TrainConfig(
    hidden=32, features=16, pretrain_epochs=5, finetune_epochs=3, trajectory_points=2,
    fisher_examples=64,
)  # fmt: skip


def test_storage_compression_bench_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zoo = ensure_zoo(tmp_path / "zoo", seed=0, tasks=["rot90", "parity"], irrelevant=0, config=TINY)
    argv = ["--shape", "tiny", "--zoo", str(zoo), "--workdir", str(tmp_path)]
    sizes, api_rows = main(argv)
    by_label = {row.label: row for row in sizes}
    assert set(by_label) == {
        "digits base (f32)", "digits 2 fine-tunes (f32)", "llama bf16 base",
        "llama bf16 dense fine-tune", "llama bf16 sparse fine-tune",
    }  # fmt: skip
    base, sparse = by_label["llama bf16 base"], by_label["llama bf16 sparse fine-tune"]
    assert base.raw / base.zipnn >= 1.3 and base.zipnn < base.zstd < base.raw
    assert sparse.delta is not None and sparse.raw / sparse.delta >= 3.0
    assert (
        by_label["llama bf16 dense fine-tune"].delta <= by_label["llama bf16 dense fine-tune"].zipnn
    )
    codecs = {(row[0], row[1]): row[2] for row in api_rows}
    assert codecs == {
        ("off", "base"): "raw", ("off", "dense"): "raw", ("off", "sparse"): "raw",
        ("zipnn", "base"): "zipnn", ("zipnn", "dense"): "zipnn-delta",
        ("zipnn", "sparse"): "zipnn-delta",
    }  # fmt: skip
    out = capsys.readouterr().out
    assert "goal bf16 whole model" in out and "goal download" in out
    assert list(tmp_path.glob("ckreg-compress-*")) == []  # scratch removed
