"""TALL masks: per-task masks over the multi-task vector and task reconstruction."""

from __future__ import annotations

import torch

import mergeops
from mergeops.methods.masks.tall import reconstruct_model  # also registers tall_masks
from mergeops.ops.masks import reconstruct_task, tall_mask, unpack_masks


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_tall_masks_hand_computed() -> None:
    # τ1 = [1, .5, 0, -2], τ2 = [.2, .5, 1, 2] -> τ_MTL = [1.2, 1, 1, 0], λ = 0.5
    # m1: |τ1| = [1, .5, 0, 2]  >  .5*|τ_MTL - τ1| = [.1, .25, .5, 1]  -> [T, T, F, T]
    # m2: |τ2| = [.2, .5, 1, 2] >  .5*|τ_MTL - τ2| = [.5, .25, 0, 1]   -> [F, T, T, T]
    tv1, tv2 = _t(1.0, 0.5, 0.0, -2.0), _t(0.2, 0.5, 1.0, 2.0)
    mtl = tv1 + tv2
    assert tall_mask(tv1, mtl, 0.5).tolist() == [True, True, False, True]
    assert tall_mask(tv2, mtl, 0.5).tolist() == [False, True, True, True]
    # task 1 back from the shared vector: θ0 + m1 ⊙ τ_MTL with θ0 = 1 -> [2.2, 2, 1, 1]
    rebuilt = reconstruct_task(torch.ones(4), mtl, tall_mask(tv1, mtl, 0.5))
    assert torch.allclose(rebuilt, _t(2.2, 2.0, 1.0, 1.0))


def test_single_task_mask_keeps_every_nonzero_entry() -> None:
    # with one task τ_MTL = τ, so |τ| > λ·0 holds wherever τ ≠ 0: the task is recovered exactly
    tv = _t(0.3, 0.0, -1.0)
    mask = tall_mask(tv, tv.clone(), 0.4)
    assert mask.tolist() == [True, False, True]
    assert torch.equal(reconstruct_task(torch.zeros(3), tv, mask), tv)


# -- end to end through mergeops.merge ---------------------------------------------------------


def test_merge_tall_masks_outputs_and_reconstruction() -> None:
    base = {"w": torch.ones(4), "n": torch.tensor([7])}
    models = {
        "t1": {"w": 1 + _t(1.0, 0.5, 0.0, -2.0), "n": torch.tensor([7])},
        "t2": {"w": 1 + _t(0.2, 0.5, 1.0, 2.0), "n": torch.tensor([7])},
    }
    out = mergeops.merge_with_extras("tall_masks", models, base=base, **{"lambda": 0.5})
    # main output θ0 + τ_MTL = 1 + [1.2, 1, 1, 0]; τ_MTL also as its own float32 stream
    assert torch.allclose(out.merged["w"], _t(2.2, 2.0, 2.0, 1.0))
    assert torch.allclose(out.extras["task_vector"]["w"], _t(1.2, 1.0, 1.0, 0.0))
    assert unpack_masks(out.extras["mask.t2"])["w"].tolist() == [False, True, True, True]
    rebuilt = reconstruct_model(base, out.extras["task_vector"], out.extras["mask.t1"])
    assert torch.allclose(rebuilt["w"], _t(2.2, 2.0, 1.0, 1.0))
    assert torch.equal(rebuilt["n"], torch.tensor([7]))


def test_tall_per_model_lambda() -> None:
    # λ = [0, 10]: λ = 0 keeps every nonzero τ entry; λ = 10 keeps almost nothing
    base = {"w": torch.zeros(4)}
    models = [{"w": _t(1.0, 0.5, 0.0, -2.0)}, {"w": _t(0.2, 0.5, 1.0, 2.0)}]
    out = mergeops.merge_with_extras("tall_masks", models, base=base, **{"lambda": [0.0, 10.0]})
    assert unpack_masks(out.extras["mask.model_0"])["w"].tolist() == [True, True, False, True]
    assert unpack_masks(out.extras["mask.model_1"])["w"].tolist() == [False, False, True, False]
