"""adamerging: coefficients learnt against an objective with a known optimum, the entropy
objective of a tiny classifier, the time budget and the coefficients stream."""

import json

import pytest
import torch

import mergeops
from mergeops.io import ShardedCheckpoint

BASE = {"a": torch.zeros(2), "b": torch.zeros(3)}
FT1 = {"a": torch.tensor([1.0, 0.0]), "b": torch.ones(3)}
FT2 = {"a": torch.tensor([0.0, 1.0]), "b": -torch.ones(3)}


class Quadratic:
    """Loss minimised at a = [0.7, 0.2] (task-wise optimum λ = (0.7, 0.2)) and b = 0.4."""

    def loss(self, params):
        return ((params["a"] - torch.tensor([0.7, 0.2])) ** 2).sum() + (
            (params["b"] - 0.4) ** 2
        ).sum()


def test_task_wise_coefficients_reach_the_optimum_of_the_objective():
    out = mergeops.merge(
        "adamerging", [FT1, FT2], base=BASE, objective=Quadratic(), device="cpu",
        granularity="task", steps=400, lr=0.02,
    )  # fmt: skip
    # task-wise, a = (λ1, λ2) and b = λ1 - λ2 share the λ: the optimum of
    # (λ1-0.7)² + (λ2-0.2)² + 3(λ1-λ2-0.4)² is λ1 + λ2 = 0.9, λ1 - λ2 = 1.45/3.5
    lam1, lam2 = (0.9 + 1.45 / 3.5) / 2, (0.9 - 1.45 / 3.5) / 2
    assert torch.allclose(out["a"], torch.tensor([lam1, lam2]), atol=0.02)
    assert torch.allclose(out["b"], torch.full((3,), lam1 - lam2), atol=0.02)


def test_layer_wise_coefficients_fit_each_tensor(tmp_path):
    result = mergeops.merge_files(
        "adamerging", [FT1, FT2], base=BASE, objective=Quadratic(), device="cpu",
        out_dir=tmp_path / "out", params={"granularity": "layer", "steps": 400, "lr": 0.02},
        progress=False,
    )  # fmt: skip
    merged = ShardedCheckpoint(result.out_dir)
    assert torch.allclose(merged.get("a"), torch.tensor([0.7, 0.2]), atol=0.03)
    assert torch.allclose(merged.get("b"), torch.full((3,), 0.4), atol=0.03)
    coefficients = ShardedCheckpoint(result.extra_outputs["coefficients"])
    lambdas = coefficients.get("lambda")
    keys = json.loads(bytes(coefficients.get("lambda.keys").tolist()).decode())
    assert lambdas.shape == (2, 2) and keys == ["a", "b"]
    assert (lambdas >= 0).all() and (lambdas <= 1).all()


class Entropy:
    """Mean prediction entropy of a linear classifier on fixed unlabeled inputs."""

    def __init__(self):
        self.x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))

    def loss(self, params):
        probs = torch.softmax(self.x @ params["w"].T, dim=1)
        return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1).mean()


def test_entropy_minimisation_sharpens_the_merged_classifier():
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(3, 4)}
    fts = [{"w": 2 * torch.randn(3, 4, generator=gen)} for _ in range(2)]
    objective = Entropy()
    start = objective.loss(
        mergeops.merge("task_arithmetic", fts, base=base, device="cpu", **{"lambda": 0.3})
    )
    out = mergeops.merge(
        "adamerging", fts, base=base, objective=objective, device="cpu", steps=50, lr=0.05
    )
    assert objective.loss(out) < start


def test_time_budget_and_bad_input():
    out = mergeops.merge(
        "adamerging", [FT1, FT2], base=BASE, objective=Quadratic(), device="cpu",
        steps=10**6, max_seconds=0.5,
    )  # fmt: skip
    assert torch.isfinite(out["a"]).all()
    with pytest.raises(mergeops.MergeError, match="needs an objective"):
        mergeops.merge("adamerging", [FT1, FT2], base=BASE, device="cpu")
    with pytest.raises(mergeops.MergeError, match="granularity"):
        mergeops.merge(
            "adamerging", [FT1, FT2], base=BASE, objective=Quadratic(), granularity="row",
            device="cpu",
        )  # fmt: skip
