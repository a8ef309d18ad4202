"""nuslerp, multislerp and karcher merge large float32 tensors in row slices from one Gram
sweep (``GramStats``): sliced == whole bit for bit for every parameter variant, the Gram
coefficients reproduce mergekit's algorithms run in float64, and a sliced large tensor matches
mergekit (to 1e-6 of its float64 result; its float32 whole-tensor norms drift by ~1e-5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking
from mergeops.methods.base import MergeError, SliceStatsMethod, get_method
from mergeops.ops.blocks import blocks_of
from mergeops.ops.gram import (
    LaneGram,
    block_column_gram,
    block_gram,
    combine_grams,
    linear_combination,
)
from mergeops.ops.karcher import karcher_coefficients, karcher_mean
from mergeops.ops.spherical import (
    AntipodalError,
    multislerp,
    multislerp_coefficients,
    nuslerp,
    nuslerp_apply,
    nuslerp_coefficients,
    nuslerp_cosine,
)
from tests.mergeops.test_slice_stats import _family, assert_sliced_matches_whole

NUSLERP = {"weight": [1.0, 2.5]}
MULTI = {"weight": [1.0, 0.5, 2.0]}

# (method, models, with base, params)
CASES: list[tuple[str, int, bool, dict[str, Any]]] = [
    ("nuslerp", 2, False, NUSLERP),
    ("nuslerp", 2, True, NUSLERP),
    ("nuslerp", 2, True, {**NUSLERP, "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", 2, False, {**NUSLERP, "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", 2, False, {**NUSLERP, "nuslerp_flatten": False}),
    ("multislerp", 3, False, MULTI),
    ("multislerp", 3, True, {**MULTI, "normalize_weights": False, "eps": 1e-6}),
    ("multislerp", 1, True, {"weight": 1.0}),
    ("karcher", 3, False, {}),
    ("karcher", 3, False, {"max_iter": 2, "tol": 1e-3}),
    ("karcher", 1, False, {}),
]


def _merge(
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
    method: str,
    family: list[dict[str, torch.Tensor]],
    count: int,
    with_base: bool,
    params: dict[str, Any],
) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
    base = family[0] if with_base else None
    return mergeops.merge(method, family[1 : 1 + count], base=base, device="cpu", **params)


@pytest.mark.parametrize(("method", "count", "with_base", "params"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliced_spherical_merges_match_whole(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    count: int,
    with_base: bool,
    params: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    family = _family(dtype, 3)
    assert isinstance(get_method(method), SliceStatsMethod)
    base = family[0] if with_base else None
    assert_sliced_matches_whole(monkeypatch, method, family[1 : 1 + count], base, **params)


# ---- the Gram coefficients against the whole-tensor algorithms in float64 -----------------
def _gram(tensors: list[torch.Tensor], columns: int = 0) -> torch.Tensor:
    if columns:
        parts = [block_column_gram(b, columns) for b in blocks_of(tensors, 7 * columns)]
        return combine_grams(parts, (len(tensors), len(tensors), columns))
    lanes = LaneGram(len(tensors), torch.device("cpu"))
    for start in range(0, tensors[0].shape[0], 8):  # row slices of 8 x 24 entries
        lanes.observe([t[start : start + 8] for t in tensors])
    return lanes.gram()


def _inputs(count: int, shape: tuple[int, ...] = (40, 24), seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [base + 0.6 * torch.randn(shape, generator=gen, dtype=torch.float64)
            for _ in range(count)]  # fmt: skip


@pytest.mark.parametrize(
    ("options", "shape", "columns"),
    [
        ({"flatten": True}, (40, 24), 0),
        ({"flatten": False, "row_wise": True}, (40, 24), 24),
        ({"flatten": False, "row_wise": True}, (10, 4, 6), 24),  # vectors along dim 0
        ({"flatten": False, "row_wise": True}, (96,), 1),
    ],
)
def test_nuslerp_from_the_gram_is_nuslerp(
    options: dict[str, bool], shape: tuple[int, ...], columns: int
) -> None:
    a, b = _inputs(2, shape)
    coefficients = nuslerp_coefficients(0.3, nuslerp_cosine(_gram([a, b], columns)).double())
    ours = nuslerp_apply(0.3, coefficients, a, b)
    assert torch.allclose(ours, nuslerp(0.3, a, b, **options), rtol=1e-6, atol=1e-7)
    same = nuslerp_coefficients(0.3, nuslerp_cosine(_gram([a, 2 * a])))
    assert bool(same[3].all())  # parallel: the linear branch
    linear = nuslerp_apply(0.3, same, a.float(), 2 * a.float(), branch="linear")
    assert torch.equal(linear, 0.7 * a.float() + 0.3 * (2 * a.float()))


@pytest.mark.parametrize(
    ("weights", "normalize", "eps"),
    [([1.0, 0.5, 2.0], True, 1e-8), ([0.3, 0.9, 0.4], False, 0.5), ([1.0, 1.0], True, 1e-8)],
)
def test_multislerp_from_the_gram_is_multislerp(
    weights: list[float], normalize: bool, eps: float
) -> None:
    xs = _inputs(len(weights))
    b = multislerp_coefficients(_gram(xs), weights, normalize_weights=normalize, eps=eps,
                                weight_dtype=torch.float64)  # fmt: skip
    expected = multislerp(xs, weights, normalize_weights=normalize, eps=eps)
    assert torch.allclose(linear_combination(b, xs), expected, rtol=1e-9, atol=1e-12)


def test_multislerp_antipodal_inputs_from_the_gram() -> None:
    x = _inputs(1)[0]
    pair = multislerp_coefficients(_gram([x, -x]), [1.0, 1.0], weight_dtype=torch.float64)
    assert pair.tolist() == [0.5, 0.5]  # linear interpolation, as multislerp does
    with pytest.raises(AntipodalError):
        multislerp_coefficients(_gram([x, -x, x, -x]), [1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (0, 1e-5), (3, 1e-2), (50, 1e-12)])
def test_karcher_from_the_gram_is_karcher(max_iter: int, tol: float) -> None:
    xs = _inputs(4)
    alphas = [0.1, 0.2, 0.3, 0.4]
    b = karcher_coefficients(_gram(xs), alphas, max_iter=max_iter, tol=tol)
    expected = karcher_mean(xs, alphas, max_iter=max_iter, tol=tol)
    assert torch.allclose(linear_combination(b, xs), expected, rtol=1e-9, atol=1e-12)


def test_karcher_zero_norm_rules_from_the_gram() -> None:
    """Zero (or below-tol) inputs leave the direction but keep their weight in the scale;
    all of them zero gives zero; a direction equal to the mean is skipped."""
    x, y = _inputs(2)
    zero = torch.zeros_like(x)
    for inputs in ([x, zero, y], [x, 1e-7 * y, y], [x, x, x], [zero, zero]):
        alphas = [1 / len(inputs)] * len(inputs)
        b = karcher_coefficients(_gram(inputs), alphas)
        expected = karcher_mean(inputs, alphas)
        assert torch.allclose(linear_combination(b, inputs), expected, rtol=1e-9, atol=1e-12)
    assert karcher_coefficients(_gram([zero, zero]), [0.5, 0.5]).tolist() == [0.0, 0.0]


# ---- a sliced large tensor against mergekit ----------------------------------------------
def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


LARGE = [
    ("nuslerp", 2, True, {"weight": [1.0, 0.6]}, 1e-6),
    ("nuslerp", 2, False, {"weight": [1.0, 0.6]}, 1e-4),
    ("nuslerp", 2, False, {"weight": 1.0, "nuslerp_flatten": False, "nuslerp_row_wise": True},
     1e-6),
    ("nuslerp", 2, True, {"weight": 1.0, "nuslerp_flatten": False}, 0.0),
    ("multislerp", 3, False, {"weight": [1.0, 0.5, 2.0]}, 1e-4),
    ("multislerp", 3, True, {"weight": [1.0, 0.5, 2.0], "normalize_weights": False}, 1e-4),
    ("karcher", 3, False, {}, 1e-4),
]  # fmt: skip


@pytest.mark.parametrize(("method", "count", "with_base", "params", "drift"), LARGE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_large_tensor_matches_mergekit(
    method: str,
    count: int,
    with_base: bool,
    params: dict[str, Any],
    drift: float,
    dtype: torch.dtype,
) -> None:
    """1100 x 1024 entries in 512-row slices: within 1e-6 of mergekit's own algorithm run in
    float64, and within ``drift`` of mergekit in float32, whose whole-tensor float32 norms
    (16-lane sequential sums) are that far off the exact value at this size."""
    from mergekit.merge_methods.api import merge_tensors

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1100, 1024, generator=gen) * 0.02
    models = [(base + 0.005 * torch.randn(1100, 1024, generator=gen)).to(dtype)
              for _ in range(count)]  # fmt: skip
    base = base.to(dtype)
    assert chunking.rows_for(get_method(method), (1100, 1024)) == 512
    ours = mergeops.merge(method, [{"w": m} for m in models], device="cpu", dtype="float32",
                          base={"w": base} if with_base else None, **params)["w"]  # fmt: skip

    def theirs(cast: torch.dtype) -> torch.Tensor:
        tensors = [m.to(cast) for m in models] + ([base.to(cast)] if with_base else [])
        index = count if with_base else None
        return merge_tensors(tensors, method, parameters=params, base_index=index)

    assert _rel(ours, theirs(torch.float64)) <= 1e-6
    assert _rel(ours, theirs(torch.float32)) <= max(drift, 1e-6)


def test_sliced_multislerp_of_antipodal_inputs_names_the_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    x = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    models = [{"w": x}, {"w": -x}, {"w": x}, {"w": -x}]
    with pytest.raises(MergeError, match="tensor 'w': the weighted mean direction"):
        mergeops.merge("multislerp", models, device="cpu", weight=1.0)


@pytest.mark.parametrize(
    ("method", "params"),
    [("nuslerp", {"weight": 1.0}), ("multislerp", {"weight": 1.0}), ("karcher", {}),
     ("nuslerp", {"weight": 1.0, "nuslerp_flatten": False, "nuslerp_row_wise": True})],
)  # fmt: skip
def test_empty_and_scalar_tensors(method: str, params: dict[str, Any]) -> None:
    models = [{"w": torch.zeros(0, 8), "s": torch.tensor(v)} for v in (2.0, 3.0)]
    out = mergeops.merge(method, models, device="cpu", **params)
    assert out["w"].shape == (0, 8)
    assert out["s"].shape == () and float(out["s"]) == pytest.approx(2.5)


def test_the_blocked_gram_of_other_devices_equals_the_lane_gram() -> None:
    """Off the CPU the Gram is summed over fixed flat blocks (``block_gram``); both sums agree
    to float64 rounding."""
    tensors = [t.float() for t in _inputs(3, (400, 24))]
    blocked = combine_grams([block_gram(b) for b in blocks_of(tensors, 1000)], (3, 3))
    assert torch.allclose(blocked, _gram(tensors), rtol=1e-12, atol=0)
