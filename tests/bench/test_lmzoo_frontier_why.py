"""bench.lmzoo.frontier_why: headroom and gains read from a claims result, task-vector geometry."""

from __future__ import annotations

import torch

from bench.lmzoo.frontier_why import (
    forgetting_lines,
    geometry,
    row_lines,
    subspace_overlap,
    verdict_lines,
    zoo_why,
)


def _result() -> dict:
    rows = [{"method": m, "params": {}, "test": {"accuracy/avg": v}}
            for m, v in (("linear", 0.50), ("task_arithmetic", 0.60), ("regmean", 0.58),
                         ("wudi", 0.65))]  # fmt: skip
    claims = {"RegMean beats task arithmetic": {"diff": -0.02, "std": 0.015, "held": False},
              "WUDI beats task arithmetic": {"diff": 0.05, "std": 0.015, "held": True}}  # fmt: skip
    return {"zoo": "lm-x", "seed": 0, "tasks": ["copy"], "rows": rows, "claims": claims,
            "summary": {"finetuned_own": 0.8}}  # fmt: skip


def test_row_lines_split_each_gain() -> None:
    lines = row_lines(_result())
    assert "fine-tunes 0.800 - task arithmetic 0.600 = +0.200" in lines[0]
    assert "TA - linear +0.100" in lines[0]
    regmean = next(line for line in lines if "regmean" in line)
    assert "vs linear +0.080" in regmean and "vs TA -0.020" in regmean
    assert "Δ -0.020 ± 0.015" in regmean
    assert not any("iso_c" in line for line in lines)  # no row, no line


def test_geometry_of_orthogonal_and_equal_task_vectors() -> None:
    base = {"w": torch.ones(4), "step": torch.tensor(3)}
    a = {"w": base["w"] + torch.tensor([1.0, 0, 0, 0]), "step": base["step"]}
    b = {"w": base["w"] + torch.tensor([0, 1.0, 0, 0]), "step": base["step"]}
    g = geometry(base, [a, b, a])
    assert abs(g["cos_max"] - 1.0) < 1e-9  # a and a
    assert abs(g["cos_mean"] - 1 / 3) < 1e-9  # (0 + 1 + 0) / 3
    assert abs(g["rel_norm"] - 0.5) < 1e-9  # ‖τ‖ = 1, ‖θ0‖ = 2


def test_zoo_why_without_the_folder_gives_the_row_lines() -> None:
    lines = zoo_why(_result(), None)
    assert lines[0].startswith("lm-x (seed 0, copy)") and len(lines) == 1 + len(
        row_lines(_result())
    )


def test_forgetting_names_the_fine_tunes_below_the_base() -> None:
    result = _result()
    result["rows"] += [{"method": m, "params": {}, "test": {"accuracy/avg": v}}
                       for m, v in (("pretrained", 0.40), ("finetune:copy", 0.45),
                                    ("finetune:sort", 0.35))]  # fmt: skip
    [line] = forgetting_lines(result)
    assert "base 0.400, fine-tunes on all tasks 0.400 (copy 0.450, sort 0.350)" in line
    assert line.endswith("below the base: sort")
    assert forgetting_lines(_result()) == []  # no pretrained / fine-tune rows


def test_subspace_overlap_of_shared_and_disjoint_directions() -> None:
    base = {"w": torch.zeros(4, 3), "embed.weight": torch.zeros(5, 2)}
    e = torch.eye(4)
    one = {"w": torch.outer(e[0], torch.ones(3)), "embed.weight": torch.ones(5, 2)}
    two = {"w": torch.outer(e[1], torch.ones(3)), "embed.weight": torch.ones(5, 2)}
    assert subspace_overlap(base, [one, one], k=1)["overlap"] > 0.999
    got = subspace_overlap(base, [one, two], k=1)
    assert got["overlap"] < 1e-9 and got["chance"] == 0.25 and got["energy_top_k"] > 0.999


def test_verdicts_count_holds_reversals_and_falls_below_linear() -> None:
    lines = verdict_lines([_result(), _result()])
    regmean = next(line for line in lines if "regmean" in line)
    assert "holds on 0/2" in regmean and "below linear on 0/2" in regmean
    assert "mean Δ vs TA -0.020 ± 0.011" in regmean
    assert regmean.endswith("fails within the noise on 2/2")
    wudi = next(line for line in lines if "wudi" in line)
    assert "holds on 2/2" in wudi and wudi.endswith("holds")
    assert not any("iso_c" in line for line in lines)
