"""The main job end to end on a reduced zoo: `ckreg serve` subprocess, REST registration,
automatic on_register merges, manual policy runs, test scoring, table, MLflow run + PNG."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_main_job_reduced(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "result.json"
    command = [
        sys.executable, "-m", "bench.merge_quality", "--embedded", "--home", str(home),
        "--tasks", "rot90,flip_lr", "--irrelevant", "1", "--finetune-epochs", "2",
        "--methods", "ties,fw", "--timeout", "120", "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=220, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout

    assert "section     method" in printed and "multitask   ties" in printed
    parity = re.search(r"max \|Δ test avg\| = ([0-9.]+)", printed)
    assert parity is not None and float(parity[1]) < 0.002  # flows reproduce in-memory merges
    assert "Papers' claims vs this run" in printed and "/api/v1/docs" in printed
    assert f"mlflow ui --backend-store-uri sqlite:///{home.resolve()}/mlflow.db" in printed

    result = json.loads(out.read_text())
    methods = {row["method"]: row for row in result["rows"]}
    expected = {"ties", "linear", "fw", "fw+1irrelevant", "task_arithmetic+1irrelevant",
                "mwa(loss)", "uniform_average", "opcm", "continual_average"}  # fmt: skip
    assert expected <= set(methods)
    for name in expected:
        row = methods[name]
        assert 0.0 <= row["test"]["accuracy/avg"] <= 1.0
        assert row["validation"] is not None, f"{name}: no validation metric from the flows"
    assert "continual/seen_avg" in methods["opcm"]["test"]
    logged, total = result["merges_logged"]
    assert total >= 10 and logged == total, result["merges_logged"]
    assert result["mlflow_run_id"]
    assert (home / "results" / "quality_table.png").stat().st_size > 1000
