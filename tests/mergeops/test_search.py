"""Search policies: CMA-ES finds a quadratic's minimum and resumes exactly; M2N2's fitness
sharing, attraction and archive replacement on hand-computed scores."""

from __future__ import annotations

import json

import pytest
import torch

from mergeops.search import (
    Archive,
    Box,
    CmaEs,
    Proposal,
    attraction,
    child_state_dict,
    shared_fitness,
)

TARGET = {"density": 0.3, "lambda": 1.4, "t": 0.8}
SPACE = {"density": [0.0, 1.0], "lambda": [0.5, 2.0], "t": [0.0, 1.0]}


def _loss(params: dict[str, float]) -> float:
    return sum((params[k] - v) ** 2 for k, v in TARGET.items())


def _generation(es: CmaEs) -> None:
    points = es.ask()
    es.tell(points, [_loss(es.box.to_params(p)) for p in points])


def test_cma_es_finds_the_minimum_of_a_quadratic():
    es = CmaEs(Box.from_space(SPACE), seed=1)
    for _ in range(60):
        _generation(es)
    assert es.best is not None
    params, loss = es.best
    assert loss < 1e-6
    assert all(abs(params[k] - v) < 1e-3 for k, v in TARGET.items())


def test_cma_es_resumes_from_its_json_state_exactly():
    straight = CmaEs(Box.from_space(SPACE), seed=2)
    for _ in range(6):
        _generation(straight)
    first = CmaEs(Box.from_space(SPACE), seed=2)
    for _ in range(3):
        _generation(first)
    resumed = CmaEs.from_state(json.loads(json.dumps(first.state_dict())))
    assert [p.tolist() for p in resumed.ask()] == [p.tolist() for p in resumed.ask()]
    for _ in range(3):
        _generation(resumed)
    assert resumed.state_dict() == straight.state_dict()


def test_box_refuses_bad_ranges():
    with pytest.raises(ValueError, match="'density'"):
        Box.from_space({"density": [1.0, 0.5]})
    with pytest.raises(ValueError, match="empty"):
        Box.from_space({})


SCORES = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def test_shared_fitness_by_hand():
    # column totals 2, 1, 1: alpha 1 -> f0 = 1/2 + 1/1, f1 = 1/2 + 1/1, f2 = 0
    assert shared_fitness(SCORES, 1.0).tolist() == [1.5, 1.5, 0.0]
    # alpha 0: no sharing, plain sums
    assert shared_fitness(SCORES, 0.0).tolist() == [2.0, 2.0, 0.0]
    # alpha 2 on fractional scores: f0 = 0.5/1^2 + 1/1^2 ... totals 1.0 and 1.0
    frac = torch.tensor([[0.5, 1.0], [0.5, 0.0]])
    assert torch.allclose(shared_fitness(frac, 2.0), torch.tensor([1.5, 0.5], dtype=torch.float64))


def test_attraction_by_hand():
    # member 1 beats member 0 only on example 2; member 0 beats 1 only on example 1
    assert attraction(SCORES, 0).tolist() == [0.0, 1.0, 0.0]
    assert attraction(SCORES, 2).tolist() == [2.0, 2.0, 0.0]


def test_archive_replaces_the_weakest_only_when_fitter():
    archive = Archive(capacity=3, alpha=1.0)
    for i, row in enumerate(SCORES):
        assert archive.offer(f"m{i}", row) == i
    assert archive.offer("dud", torch.zeros(3)) is None  # ties the weakest: not kept
    slot = archive.offer("child", torch.tensor([0.0, 1.0, 1.0]))
    assert slot == 2 and archive.ids == ["m0", "m1", "child"]
    assert archive.best() in (0, 1, 2)
    restored = Archive.from_state(json.loads(json.dumps(archive.state_dict())))
    assert restored.ids == archive.ids and torch.equal(restored.fitness(), archive.fitness())


def test_proposals_are_deterministic_and_attracted():
    archive = Archive(capacity=3, alpha=1.0, seed=7)
    for i, row in enumerate(SCORES):
        archive.offer(f"m{i}", row)
    proposals = [archive.propose(step, n_tensors=4) for step in range(50)]
    assert proposals == [archive.propose(step, n_tensors=4) for step in range(50)]
    for p in proposals:
        assert p.parent_a in (0, 1)  # member 2 has fitness 0
        assert p.parent_b == 1 - p.parent_a  # the only member attracted to either
        assert 0 <= p.mix <= 1 and 0 <= p.split <= 4


def test_child_mixes_w_before_the_split_and_one_minus_w_after():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([2.0, 0.0]), "n": torch.tensor([3])}
    b = {"x": torch.tensor([0.0, 1.0]), "y": torch.tensor([0.0, 2.0]), "n": torch.tensor([4])}
    child = child_state_dict(a, b, Proposal(0, 1, mix=0.0, split=1))
    assert torch.allclose(child["x"], a["x"]) and torch.allclose(child["y"], b["y"])
    assert torch.equal(child["n"], a["n"])
    half = child_state_dict(a, b, Proposal(0, 1, mix=0.5, split=2))
    assert torch.allclose(half["x"], torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-6)
