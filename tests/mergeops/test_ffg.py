"""FFG (Fast Fisher Grafting): saliency, one exact model-wide threshold, masks, grafting."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import mergeops
from mergeops.io import ShardedCheckpoint
from mergeops.methods.base import MergeError
from mergeops.ops.masks import (
    ffg_saliency,
    graft,
    keep_count,
    kth_largest_magnitude,
    threshold_mask,
    unpack_masks,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_saliency_threshold_and_graft_hand_computed() -> None:
    # s = v ⊙ τ² : v = [1, 4, 0, 2], τ = [3, 1, 5, -2] -> [9, 4, 0, 8]
    s1 = ffg_saliency(_t(1.0, 4.0, 0.0, 2.0), _t(3.0, 1.0, 5.0, -2.0))
    assert s1.tolist() == [9.0, 4.0, 0.0, 8.0]
    # second tensor of the same model: s = [1, 7]; all six sorted: 9 8 7 4 1 0
    s2 = _t(1.0, 7.0)
    k = keep_count(6, 0.5)  # ⌊0.5*6⌋ = 3 -> third largest = 7
    thr = kth_largest_magnitude(lambda: iter([s1, s2]), k)
    assert (k, thr) == (3, 7.0)
    assert threshold_mask(s1, thr).tolist() == [True, False, False, True]
    assert threshold_mask(s2, thr).tolist() == [False, True]
    # graft θ0 + M ⊙ τ with θ0 = 1: [1+3, 1, 1, 1-2]
    grafted = graft(torch.ones(4), _t(3.0, 1.0, 5.0, -2.0), threshold_mask(s1, thr))
    assert grafted.tolist() == [4.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_radix_selection_is_exact(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(50, generator=gen).abs() * 1e-19,  # tiny, second-moment-like values
        torch.randint(0, 4, (37,), generator=gen).float(),  # many exact ties
        torch.tensor([0.0, -0.0, 1e-45, 3.0e38]),  # zeros, a denormal, a huge value
    ]
    flat = torch.cat(tensors).abs()
    for k in (1, 2, 17, 40, flat.numel()):
        expected = torch.kthvalue(flat, flat.numel() - k + 1).values.item()
        assert kth_largest_magnitude(lambda: iter(tensors), k) == expected


def test_threshold_selection_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="5-th largest of 3"):
        kth_largest_magnitude(lambda: iter([torch.ones(3)]), 5)
    with pytest.raises(ValueError, match="NaN"):
        kth_largest_magnitude(lambda: iter([_t(1.0, float("nan"))]), 1)
    with pytest.raises(ValueError, match="density"):
        keep_count(10, 0.0)
    assert keep_count(10, 0.01) == 1
    assert keep_count(100, 0.29) == 29


# -- end to end through mergeops.merge / merge_files -------------------------------------------

BASE = {"x": torch.ones(4), "y": torch.zeros(2)}
MODEL = {"x": _t(4.0, 2.0, 6.0, -1.0), "y": _t(1.0, 1.0)}  # τ_x = [3, 1, 5, -2], τ_y = [1, 1]
MOMENT = {"x": _t(1.0, 4.0, 0.0, 2.0), "y": _t(1.0, 7.0)}  # s_x = [9, 4, 0, 8], s_y = [1, 7]


def test_merge_ffg_one_model_grafts_and_emits_packed_masks() -> None:
    # as above: density 0.5 over 6 entries -> threshold 7 -> x [T, F, F, T], y [F, T]
    out = mergeops.merge_with_extras(
        "ffg", {"ft-1": MODEL}, base=BASE, second_moments=[MOMENT], density=0.5
    )
    assert out.merged["x"].tolist() == [4.0, 1.0, 1.0, -1.0]
    assert out.merged["y"].tolist() == [0.0, 1.0]
    packed = out.extras["mask.ft-1"]
    assert packed["x"].dtype == torch.uint8
    masks = unpack_masks(packed)
    assert masks["x"].tolist() == [True, False, False, True]
    assert masks["y"].tolist() == [False, True]


def test_merge_ffg_given_threshold_and_several_models() -> None:
    # ft-2 = ft-1 with thresholds 8 (-> x [T, F, F, T], y [F, F]) and 0.5 (all but s = 0)
    out = mergeops.merge_with_extras(
        "ffg",
        {"ft-1": MODEL, "ft 2": MODEL},
        base=BASE,
        second_moments=[MOMENT, MOMENT],
        threshold=[8.0, 0.5],
    )
    assert out.merged == {}
    assert unpack_masks(out.extras["mask.ft-1"])["y"].tolist() == [False, False]
    assert unpack_masks(out.extras["mask.ft_2"])["x"].tolist() == [True, True, False, True]
    assert out.extras["grafted.ft_2"]["x"].tolist() == [4.0, 2.0, 1.0, -1.0]


def test_merge_files_masks_load_back_exactly(tmp_path) -> None:
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(5, 7, generator=gen), "b": torch.randn(7, generator=gen)}
    model = {k: t + torch.randn(t.shape, generator=gen) for k, t in base.items()}
    moment = {k: torch.rand(t.shape, generator=gen) for k, t in base.items()}
    for name, tensors in [("base", base), ("ft", model), ("v", moment)]:
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    result = mergeops.merge_files(
        "ffg",
        [tmp_path / "ft.safetensors"],
        base=tmp_path / "base.safetensors",
        second_moments=[tmp_path / "v.safetensors"],
        out_dir=tmp_path / "out",
        params={"density": 0.3},
        model_names=["ft"],
        progress=False,
    )
    stored = ShardedCheckpoint(result.extra_outputs["mask.ft"])
    masks = unpack_masks({k: stored.get(k) for k in stored.keys()})  # noqa: SIM118 - a source, not a dict
    saliency = {k: moment[k] * (model[k] - base[k]) ** 2 for k in base}
    flat = torch.cat([s.reshape(-1) for s in saliency.values()])
    k = keep_count(flat.numel(), 0.3)
    threshold = flat.kthvalue(flat.numel() - k + 1).values
    for key in base:
        assert torch.equal(masks[key], saliency[key] >= threshold), key
    assert sum(int(m.sum()) for m in masks.values()) == k  # continuous values: no ties


def test_ffg_parameter_errors_name_the_model() -> None:
    with pytest.raises(MergeError, match=r"model 'ft-1'.*exactly one of density or threshold"):
        mergeops.merge("ffg", {"ft-1": MODEL}, base=BASE, second_moments=[MOMENT])
    with pytest.raises(MergeError, match="needs a base"):
        mergeops.merge("ffg", {"ft-1": MODEL}, second_moments=[MOMENT], density=0.5)
