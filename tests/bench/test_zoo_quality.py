"""bench.zoo.quality on a tiny zoo: every section runs through mergeops and yields a table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.zoo.evaluator import DigitsEvaluator
from bench.zoo.loaded import load_zoo
from bench.zoo.quality import GRIDS, format_table, multitask_rows, run_quality, select
from bench.zoo.sequences import continual_rows, trajectory_rows
from tests.bench.test_zoo import _build


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zoo-quality")
    _build(out)
    return out


def test_select_keeps_the_best_validation_score() -> None:
    grid = [{"lambda": 0.1}, {"lambda": 0.7}, {"lambda": 0.3}]
    params, merged, score = select(
        lambda p: {"w": torch.tensor(p["lambda"])},
        grid,
        lambda sd: -abs(float(sd["w"]) - 0.35),
    )
    assert params == {"lambda": 0.3} and score == pytest.approx(-0.05)
    assert float(merged["w"]) == pytest.approx(0.3)


def test_multitask_rows(zoo: Path) -> None:
    val = DigitsEvaluator(zoo, split="validation")
    test = DigitsEvaluator(zoo, split="test")
    rows = multitask_rows(
        load_zoo(zoo), val, test, methods=["linear", "task_arithmetic", "ties"], log=lambda _: None
    )
    by_name = {row.method: row for row in rows}
    assert {"pretrained", "finetune:rot90", "linear", "task_arithmetic", "ties"} <= set(by_name)
    assert by_name["task_arithmetic"].params in GRIDS["task_arithmetic"]
    for name in ("linear", "task_arithmetic", "ties"):
        row = by_name[name]
        assert row.validation is not None and 0 <= row.test["accuracy/avg"] <= 1
    table = format_table(rows)
    assert "task_arithmetic" in table and "norm_avg" in table


def test_sequence_sections(zoo: Path) -> None:
    loaded = load_zoo(zoo)
    trajectory = trajectory_rows(zoo, loaded.manifest, log=lambda _: None)
    assert [r.method for r in trajectory] == ["mwa(loss)", "uniform_average", "last_checkpoint"]
    last = trajectory[-1]
    for task, entry in loaded.manifest.tasks.items():
        assert last.test[f"accuracy/{task}"] == pytest.approx(entry.accuracy["finetune/test"])
    val = DigitsEvaluator(zoo, split="validation")
    test = DigitsEvaluator(zoo, split="test")
    continual = continual_rows(loaded, val, test, log=lambda _: None)
    assert [r.method for r in continual] == [
        "opcm",
        "continual_average",
        "continual_task_arithmetic",
    ]
    assert all("continual/seen_avg" in r.test for r in continual)


def test_run_quality_end_to_end(zoo: Path) -> None:
    rows = run_quality(zoo, methods=["linear"], sections=("multitask",), log=lambda _: None)
    assert any(r.method == "linear" for r in rows)


def test_frontier_methods_run_on_the_zoo(zoo: Path) -> None:
    """regmean (grams from the zoo), adamerging (entropy on unlabeled inputs) and emr (served
    per task) each give a row; the entropy objective drops under adamerging."""
    loaded = load_zoo(zoo)
    val = DigitsEvaluator(zoo, split="validation")
    test = DigitsEvaluator(zoo, split="test")
    rows = multitask_rows(
        loaded, val, test, methods=["regmean", "iso_c", "emr"], log=lambda _: None
    )
    by_name = {row.method: row for row in rows}
    assert {"regmean", "iso_c", "emr(per-task)"} <= set(by_name)
    for row in (by_name["regmean"], by_name["iso_c"], by_name["emr(per-task)"]):
        assert 0 <= row.test["accuracy/avg"] <= 1
    entropy = val.unlabeled_objective()
    import mergeops

    tasks = list(loaded.tasks.values())
    start = mergeops.merge("task_arithmetic", tasks, base=loaded.base, **{"lambda": 0.3})
    learnt = mergeops.merge(
        "adamerging", tasks, base=loaded.base, objective=entropy, steps=20, lr=0.02
    )
    assert float(entropy.loss(learnt)) < float(entropy.loss(start))
