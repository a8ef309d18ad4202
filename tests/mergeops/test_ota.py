"""OTA (curvature-aware merging): hand-computed tensors, reductions, rank-1 second moments."""

from __future__ import annotations

import pytest
import torch

import mergeops
from mergeops.methods.base import MergeError
from mergeops.ops.curvature import (
    ota_merge_with_base,
    ota_merge_without_base,
    preconditioner,
    rank1_approx,
    rank1_factors,
)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_ota_with_base_hand_computed() -> None:
    # v1 = [4, 1, 0], v2 = [16, 9, 0] -> P = sqrt(v): P1 = [2, 1, 0], P2 = [4, 3, 0]
    # entry 0: (2*1 + 4*3) / 6 = 7/3; entry 1: (1*2 + 3*0) / 4 = 0.5;
    # entry 2: sum W = 2 eps <= 1.1*2*eps -> falls back to the base value 10.
    base = _t(0.0, 0.0, 10.0)
    tvs = [_t(1.0, 2.0, 5.0), _t(3.0, 0.0, -5.0)]
    pre = [preconditioner(_t(4.0, 1.0, 0.0)), preconditioner(_t(16.0, 9.0, 0.0))]
    merged = ota_merge_with_base(base, tvs, pre, eps=1e-8)
    assert torch.allclose(merged, _t(7 / 3, 0.5, 10.0), atol=1e-6)


def test_ota_masks_drop_models_and_fall_back_when_all_masked() -> None:
    # Same inputs; M1 = [0, 1, 1], M2 = [1, 0, 1]
    # entry 0: only model 2 -> 3; entry 1: only model 1 -> 2; entry 2: fallback 10.
    base = _t(0.0, 0.0, 10.0)
    tvs = [_t(1.0, 2.0, 5.0), _t(3.0, 0.0, -5.0)]
    pre = [_t(2.0, 1.0, 0.0), _t(4.0, 3.0, 0.0)]
    masks = [torch.tensor([False, True, True]), torch.tensor([True, False, True])]
    merged = ota_merge_with_base(base, tvs, pre, eps=1e-8, masks=masks)
    assert torch.allclose(merged, _t(3.0, 2.0, 10.0), atol=1e-6)


def test_ota_equal_second_moments_is_the_average_task_vector() -> None:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, generator=gen)
    tvs = [torch.randn(6, generator=gen) for _ in range(3)]
    pre = [preconditioner(torch.full((6,), 0.25))] * 3
    merged = ota_merge_with_base(base, tvs, pre)
    assert torch.allclose(merged, base + torch.stack(tvs).mean(0), atol=1e-6)


def test_ota_without_base_hand_computed() -> None:
    # θ1 = [1, 2], θ2 = [3, 6]; P1 = [1, 3], P2 = [3, 1]
    # entry 0: (1*1 + 3*3)/4 = 2.5; entry 1: (3*2 + 1*6)/4 = 3
    merged = ota_merge_without_base([_t(1.0, 2.0), _t(3.0, 6.0)], [_t(1.0, 3.0), _t(3.0, 1.0)])
    assert torch.allclose(merged, _t(2.5, 3.0), atol=1e-6)


def test_preconditioner_power_and_global_mean() -> None:
    # v = [1, 4, 16] -> sqrt = [1, 2, 4]; divided by the mean 7/3 -> [3/7, 6/7, 12/7]
    p = preconditioner(_t(1.0, 4.0, 16.0), power=0.5, mean=7 / 3)
    assert torch.allclose(p, _t(3 / 7, 6 / 7, 12 / 7))
    assert torch.allclose(preconditioner(_t(1.0, 4.0), power=1.0), _t(1.0, 4.0))
    with pytest.raises(ValueError, match="mean"):
        preconditioner(_t(1.0), mean=0.0)


def test_rank1_second_moment() -> None:
    # v = [[1, 2], [3, 4]]: r = [3, 7], c = [4, 6], Σv = 10 -> r cᵀ/10 = [[1.2, 1.8], [2.8, 4.2]]
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    rows, cols = rank1_factors(v)
    assert rows.tolist() == [3.0, 7.0] and cols.tolist() == [4.0, 6.0]
    assert torch.allclose(rank1_approx(v), torch.tensor([[1.2, 1.8], [2.8, 4.2]]))
    # a rank-1 v is reproduced exactly; other ranks pass through; all-zero stays zero
    outer = torch.outer(_t(1.0, 2.0), _t(1.0, 2.0))
    assert torch.allclose(rank1_approx(outer), outer)
    assert torch.equal(rank1_approx(_t(1.0, 2.0)), _t(1.0, 2.0))
    assert torch.equal(rank1_approx(torch.zeros(2, 3)), torch.zeros(2, 3))


# -- end to end through mergeops.merge ---------------------------------------------------------


BASE = {"w": _t(0.0, 0.0, 10.0), "b": _t(1.0, 1.0), "step": torch.tensor([3])}
MODELS = {
    "ft-1": {"w": _t(1.0, 2.0, 15.0), "b": _t(2.0, 1.0), "step": torch.tensor([3])},
    "ft-2": {"w": _t(3.0, 0.0, 5.0), "b": _t(1.0, 1.0), "step": torch.tensor([3])},
}
MOMENTS = [
    {"w": _t(4.0, 1.0, 0.0), "b": _t(16.0, 4.0)},
    {"w": _t(16.0, 9.0, 0.0), "b": _t(16.0, 4.0)},
]


def test_merge_ota_hand_computed() -> None:
    # w: as test_ota_with_base_hand_computed -> [7/3, .5, 10]; b: equal v -> mean τ = [.5, 0]
    merged = mergeops.merge("ota", MODELS, base=BASE, second_moments=MOMENTS)
    assert torch.allclose(merged["w"], _t(7 / 3, 0.5, 10.0), atol=1e-6)
    assert torch.allclose(merged["b"], _t(1.5, 1.0), atol=1e-6)
    assert torch.equal(merged["step"], torch.tensor([3]))


def test_merge_ota_bf16_equal_moments_is_average_task_vector() -> None:
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 3, generator=gen).bfloat16()}
    models = [
        {"w": (base["w"].float() + torch.randn(4, 3, generator=gen)).bfloat16()} for _ in range(3)
    ]
    moments = [{"w": torch.full((4, 3), 1e-3)}] * 3
    merged = mergeops.merge("ota", models, base=base, second_moments=moments)
    expected = torch.stack([m["w"].float() for m in models]).mean(0)
    assert merged["w"].dtype == torch.bfloat16
    assert torch.allclose(merged["w"].float(), expected.bfloat16().float(), atol=1e-2)


def test_merge_ota_global_normalisation_uses_the_model_wide_mean() -> None:
    # model 1: v = {w: [1, 4], b: [16]} -> √v = [1, 2], [4], model-wide mean 7/3 -> P1 = [3/7, …]
    # model 2: v = 1 everywhere -> P2 = 1. τ1 = [1, 0], τ2 = [0, 0] on w:
    # w[0] = (3/7·1) / (3/7 + 1) = 0.3 (0.5 without normalisation)
    base = {"w": _t(0.0, 0.0), "b": _t(0.0)}
    models = [{"w": _t(1.0, 0.0), "b": _t(0.0)}, {"w": _t(0.0, 0.0), "b": _t(0.0)}]
    moments = [{"w": _t(1.0, 4.0), "b": _t(16.0)}, {"w": _t(1.0, 1.0), "b": _t(1.0)}]
    plain = mergeops.merge("ota", models, base=base, second_moments=moments)
    normed = mergeops.merge("ota", models, base=base, second_moments=moments, normalise="global")
    assert plain["w"][0].item() == pytest.approx(0.5, abs=1e-6)
    assert normed["w"][0].item() == pytest.approx(0.3, abs=1e-6)


def test_merge_ota_without_base() -> None:
    merged = mergeops.merge(
        "ota",
        [{"x": _t(1.0, 2.0)}, {"x": _t(3.0, 6.0)}],
        second_moments=[{"x": _t(1.0, 9.0)}, {"x": _t(9.0, 1.0)}],
    )
    assert torch.allclose(merged["x"], _t(2.5, 3.0), atol=1e-6)


def test_merge_ota_rank1_full_and_factored_layouts_agree() -> None:
    gen = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    models = [
        {k: t + torch.randn(t.shape, generator=gen) for k, t in base.items()} for _ in range(2)
    ]
    moments = [{k: torch.rand(t.shape, generator=gen) for k, t in base.items()} for _ in range(2)]
    full = mergeops.merge("ota", models, base=base, second_moments=moments, second_moment="rank1")
    expected = ota_merge_with_base(
        base["w"],
        [m["w"] - base["w"] for m in models],
        [preconditioner(rank1_approx(v["w"])) for v in moments],
    )
    assert torch.allclose(full["w"], expected, atol=1e-6)
    factored = []
    for v in moments:
        rows, cols = rank1_factors(v["w"])
        factored.append({"w:rank1_rows": rows, "w:rank1_cols": cols, "b": v["b"]})
    compact = mergeops.merge("ota", models, base=base, second_moments=factored)
    assert torch.allclose(compact["w"], full["w"], atol=1e-6)
    assert torch.allclose(compact["b"], full["b"], atol=1e-6)


def test_merge_ota_missing_second_moment_names_model_and_tensor() -> None:
    moments = [MOMENTS[0], {"w": MOMENTS[1]["w"]}]
    with pytest.raises(MergeError, match="missing second moment for model 'ft-2' tensor 'b'"):
        mergeops.merge("ota", MODELS, base=BASE, second_moments=moments)
    bad = [MOMENTS[0], {"w": _t(1.0, 1.0), "b": MOMENTS[1]["b"]}]
    with pytest.raises(MergeError, match=r"model 'ft-2' tensor 'w': \(2,\), weights \(3,\)"):
        mergeops.merge("ota", MODELS, base=BASE, second_moments=bad)
    with pytest.raises(MergeError, match="second_moment"):
        mergeops.merge("ota", MODELS, base=BASE)


def test_merge_ota_ffg_density_one_is_ota_and_masks_drop_models() -> None:
    plain = mergeops.merge("ota", MODELS, base=BASE, second_moments=MOMENTS)
    full = mergeops.merge("ota_ffg", MODELS, base=BASE, second_moments=MOMENTS, density=1.0)
    for key in ("w", "b"):
        assert torch.allclose(full[key], plain[key], atol=1e-6)
    # saliencies v ⊙ τ²: ft-1 w = [4, 4, 0], b = [16, 0]; ft-2 w = [144, 0, 0], b = [0, 0]
    # thresholds: ft-1 5 keeps only b[0]; ft-2 1 keeps only w[0]
    # w[0]: only ft-2 -> 3; w[1]: nobody (ΣW = 2ε) -> θ0 = 0; b[0]: only ft-1 -> 1 + 1 = 2
    masked = mergeops.merge(
        "ota_ffg",
        MODELS,
        base=BASE,
        second_moments=MOMENTS,
        model_params=[{"threshold": 5.0}, {"threshold": 1.0}],
    )
    assert torch.allclose(masked["w"], _t(3.0, 0.0, 10.0), atol=1e-6)
    assert torch.allclose(masked["b"], _t(2.0, 1.0), atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ota", {"normalise": "global", "second_moment": "rank1"}),
        ("ota_ffg", {"density": 0.4}),
        ("ffg", {"density": 0.4}),
        ("tall_masks", {}),
        ("consensus", {"k": 2}),
        ("opcm", {}),
    ],
)
def test_cuda_matches_cpu_for_advanced_methods(method: str, params: dict) -> None:
    gen = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    models = {
        f"ft-{i}": {k: t + 0.1 * torch.randn(t.shape, generator=gen) for k, t in base.items()}
        for i in range(3)
    }
    moments = [{k: torch.rand(t.shape, generator=gen) for k, t in base.items()} for _ in models]
    side = {"second_moments": moments} if method in ("ota", "ota_ffg", "ffg") else {}
    outs = [
        mergeops.merge_with_extras(method, models, base=base, device=d, **side, **params)
        for d in ("cpu", "cuda")
    ]
    for key, tensor in outs[0].merged.items():
        assert torch.allclose(outs[1].merged[key], tensor, atol=1e-5), key
    for stream, tensors in outs[0].extras.items():
        for key, tensor in tensors.items():
            assert torch.allclose(outs[1].extras[stream][key].float(), tensor.float(), atol=1e-5)
