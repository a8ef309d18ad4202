"""Consensus merging: keep entries that at least k tasks' TALL masks select."""

from __future__ import annotations

import pytest
import torch

import mergeops
from mergeops.methods.base import MergeError
from mergeops.ops.masks import consensus_mask, consensus_merge, tall_mask


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_consensus_hand_computed() -> None:
    # masks from test_tall: m1 = [T, T, F, T], m2 = [F, T, T, T]; votes = [1, 2, 1, 2]
    tv1, tv2 = _t(1.0, 0.5, 0.0, -2.0), _t(0.2, 0.5, 1.0, 2.0)
    mtl = tv1 + tv2  # [1.2, 1, 1, 0]
    masks = [tall_mask(tv1, mtl, 0.5), tall_mask(tv2, mtl, 0.5)]
    mask = consensus_mask(masks, k=2)
    assert mask.tolist() == [False, True, False, True]
    # θ0 + alpha (m ⊙ τ_MTL) with θ0 = 0, alpha = 0.5 -> [0, .5, 0, 0]
    assert torch.allclose(consensus_merge(torch.zeros(4), mtl, mask, 0.5), _t(0, 0.5, 0, 0))
    # k = 1 keeps the union, k = 3 keeps nothing
    assert consensus_mask(masks, k=1).tolist() == [True, True, True, True]
    assert not consensus_mask(masks, k=3).any()


def test_consensus_needs_masks() -> None:
    with pytest.raises(ValueError, match="at least one mask"):
        consensus_mask([], k=2)


# -- end to end through mergeops.merge ---------------------------------------------------------


def test_merge_consensus_hand_computed() -> None:
    base = {"w": torch.ones(4)}
    models = [{"w": 1 + _t(1.0, 0.5, 0.0, -2.0)}, {"w": 1 + _t(0.2, 0.5, 1.0, 2.0)}]
    merged = mergeops.merge("consensus", models, base=base, k=2, alpha=0.5, **{"lambda": 0.5})
    assert torch.allclose(merged["w"], _t(1.0, 1.5, 1.0, 1.0))
    # k = 1 with alpha = 1 and λ = 0 keeps all of τ_MTL: task arithmetic
    union = mergeops.merge("consensus", models, base=base, k=1, **{"lambda": 0.0})
    assert torch.allclose(union["w"], _t(2.2, 2.0, 2.0, 1.0))


def test_merge_consensus_rejects_k_above_model_count() -> None:
    models = [{"w": torch.ones(2)}, {"w": torch.ones(2)}]
    with pytest.raises(MergeError, match="k=3 exceeds the 2 models"):
        mergeops.merge("consensus", models, base={"w": torch.zeros(2)}, k=3)
