"""Reporting for the merge-quality benchmark: papers' claims vs. this run, the PNG, MLflow.

The table text itself is ``bench.zoo.quality.format_table``; this module adds what is read
from it: whether each method's paper claim holds on this zoo, the agreement with the in-memory
run, a picture of the table, and one MLflow run (experiment ``ckreg-merge-quality``) with all of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.zoo.loaded import Row

EXPERIMENT = "ckreg-merge-quality"

# (claim, paper, better row, worse row, metric): "better" should beat "worse" on the metric.
CLAIMS: list[tuple[str, str, str, str, str]] = [
    ("TIES beats task arithmetic", "arXiv 2306.01708", "ties", "task_arithmetic", "accuracy/avg"),
    (
        "DARE drop+rescale keeps TIES' accuracy",
        "arXiv 2311.03099",
        "dare_ties",
        "ties",
        "accuracy/avg",
    ),
    (
        "Fisher weighting beats plain averaging",
        "arXiv 2111.09832",
        "fisher",
        "linear",
        "accuracy/avg",
    ),
    (
        "Consensus masks beat task arithmetic",
        "arXiv 2405.07813",
        "consensus",
        "task_arithmetic",
        "accuracy/avg",
    ),
    (
        "Curvature-aware OTA beats task arithmetic",
        "arXiv 2509.11167",
        "ota",
        "task_arithmetic",
        "accuracy/avg",
    ),
    ("OTA+FFG keeps OTA's accuracy", "arXiv 2509.11167", "ota_ffg", "ota", "accuracy/avg"),
    (
        "FW-Merging beats task arithmetic",
        "arXiv 2503.12649",
        "fw",
        "task_arithmetic",
        "accuracy/avg",
    ),
    (
        "FW-Merging beats task arithmetic with irrelevant models in the pool",
        "arXiv 2503.12649",
        "fw+{n}irrelevant",
        "task_arithmetic+{n}irrelevant",
        "accuracy/avg",
    ),
    (
        "MWA (loss-weighted) beats the uniform trajectory average",
        "arXiv 2504.18580",
        "mwa(loss)",
        "uniform_average",
        "accuracy/avg",
    ),
    (
        "OPCM beats continual averaging",
        "arXiv 2501.09522",
        "opcm",
        "continual_average",
        "accuracy/avg",
    ),
    (
        "OPCM beats continual averaging on tasks seen so far",
        "arXiv 2501.09522",
        "opcm",
        "continual_average",
        "continual/seen_avg",
    ),
]
TIE = 0.005  # differences below half a percentage point count as a tie on this small test set
KEEP = 0.01  # "keeps X's accuracy": at most one percentage point below X


def claims_section(rows: Sequence[Row], n_irrelevant: int) -> list[str]:
    """One line per claim whose rows are in the table: numbers and whether it holds here."""
    by_name = {row.method: row for row in rows}
    lines = []
    for claim, paper, better, worse, metric in CLAIMS:
        a, b = better.format(n=n_irrelevant), worse.format(n=n_irrelevant)
        if a not in by_name or b not in by_name or metric not in by_name[a].test:
            continue
        x, y = by_name[a].test[metric], by_name[b].test[metric]
        if "keeps" in claim:  # a retention claim: no more than a point lower
            verdict = "holds" if x > y - KEEP else "does not hold"
        else:
            verdict = "tie" if abs(x - y) < TIE else ("holds" if x > y else "does not hold")
        lines.append(f"  {claim} ({paper}): {a} {x:.3f} vs {b} {y:.3f} [{metric}] -> {verdict}")
    return lines


def parity_lines(rows: Sequence[Row], reference: Sequence[Row]) -> list[str]:
    """How far the registry's test averages are from the in-memory run's (same params)."""
    memory = {(r.section, r.method): r.test.get("accuracy/avg") for r in reference}
    deltas = []
    for row in rows:
        other = memory.get((row.section, row.method))
        value = row.test.get("accuracy/avg")
        if other is not None and value is not None and row.section != "individual":
            deltas.append((abs(value - other), row.method))
    if not deltas:
        return []
    worst = max(deltas)
    lines = [
        f"REST/flows vs in-memory (bench.zoo.quality, same params): max |Δ test avg| = "
        f"{worst[0]:.4f} over {len(deltas)} rows" + (f" (largest: {worst[1]})" if worst[0] else "")
    ]
    return lines


def table_figure(rows: Sequence[Row], path: Path) -> Path:
    """A heatmap of test accuracy per task (+ average, normalised average) for every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k.split("/", 1)[1] for r in rows for k in r.test if k.startswith("accuracy/")})
    tasks = [t for t in tasks if t != "avg"]
    columns = [*tasks, "avg", "norm_avg"]
    keys = [*(f"accuracy/{t}" for t in tasks), "accuracy/avg", "normalized_accuracy/avg"]
    values = [[row.test.get(k, float("nan")) for k in keys] for row in rows]
    fig, ax = plt.subplots(figsize=(1.0 * len(columns) + 3, 0.32 * len(rows) + 1.5))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.05, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), [f"{r.section}: {r.method}" for r in rows])
    for i, line in enumerate(values):
        for j, value in enumerate(line):
            if value == value:  # not NaN
                color = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_title("ckreg merge quality: test accuracy (params chosen on validation)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_name(row: Row, key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]", "_", f"{row.section}/{row.method}/{key}")


def _experiment_id(client: Any, tracking_uri: str) -> str:
    """The benchmark's experiment, created beside the registry's MLflow database if missing."""
    from flows.tracking.mlflow_sync import default_artifact_location

    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None:
        return str(found.experiment_id)
    location = default_artifact_location(tracking_uri)
    return str(client.create_experiment(EXPERIMENT, artifact_location=location))


def log_to_mlflow(
    *,
    tracking_uri: str,
    rows: Sequence[Row],
    table: str,
    params: dict[str, Any],
    out_dir: Path,
) -> str:
    """One run in experiment ``ckreg-merge-quality``: params, per-row metrics, table, JSON, PNG.

    Returns the MLflow run id.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(_experiment_id(client, tracking_uri), run_name="merge-quality")
    run_id = run.info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, str(value)[:500])
    metrics = [
        mlflow.entities.Metric(_metric_name(row, key), float(value), 0, 0)
        for row in rows
        for key, value in row.test.items()
        if key in ("accuracy/avg", "normalized_accuracy/avg", "continual/seen_avg")
    ]
    client.log_batch(run_id, metrics=metrics)
    (out_dir / "quality_table.txt").write_text(table + "\n")
    (out_dir / "quality_rows.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    table_figure(rows, out_dir / "quality_table.png")
    for name in ("quality_table.txt", "quality_rows.json", "quality_table.png"):
        client.log_artifact(run_id, str(out_dir / name))
    client.set_terminated(run_id)
    return run_id
