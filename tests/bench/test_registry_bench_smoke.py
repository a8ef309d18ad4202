"""Tiny-size runs of the registry benchmarks, so they keep working (not a performance test)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from bench import registry_queries, registry_upload
from bench._common import RssSampler, format_table, percentile, rss_bytes
from tests.services import require

pytestmark = pytest.mark.timeout(120)


def _moto_available() -> bool:
    return (Path(sys.executable).parent / "moto_server").exists() or bool(
        shutil.which("moto_server")
    )


def test_helpers(tmp_path: Path) -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 95) == 5.0
    table = format_table(("name", "ms"), [("a", 1.0), ("bbb", 12.5)])
    assert table.splitlines()[2].split() == ["a", "1.00"]
    assert table.splitlines()[3].endswith("12.50")

    with RssSampler(os.getpid(), interval=0.01) as rss:
        ballast = bytearray(32 * 1024 * 1024)
        ballast[::4096] = b"x" * len(ballast[::4096])
    assert rss.peak >= rss.baseline > 0
    assert rss_bytes(os.getpid()) > 0


def test_upload_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not _moto_available():
        require("moto_server", "not installed in this environment")
    rows = registry_upload.run(2, diagnose=True, workdir=tmp_path)
    assert rows[0].method == "boto3 upload_file"
    assert all(row.seconds > 0 for row in rows)
    assert rows[1].rss_growth is not None
    assert "x boto3" in capsys.readouterr().out


def test_queries_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = registry_queries.run(300, requests=3, workdir=tmp_path)
    assert "lineage depth=5 of chain tip" in results
    assert all(summary["p50"] > 0 for summary in results.values())
    assert "p95 ms" in capsys.readouterr().out


def test_seed_builds_deep_chains() -> None:
    rows, info = registry_queries._build(400, seed=1)
    assert info.total == len(rows.checkpoints) == 400
    assert len(info.chain_tips) >= 1
    inputs = {(e["child_id"], e["parent_id"]) for e in rows.lineage if e["role"] == "input"}
    node, levels = info.chain_tips[0], 0
    while True:
        parents = [p for c, p in inputs if c == node and p in _merged_ids(rows)]
        if not parents:
            break
        node, levels = parents[0], levels + 1
    assert levels + 1 >= registry_queries.CHAIN_LEVELS


def _merged_ids(rows: registry_queries._Rows) -> set[int]:
    return {c["id"] for c in rows.checkpoints if c["kind"] == "merged"}
