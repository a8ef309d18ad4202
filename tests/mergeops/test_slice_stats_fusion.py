"""model_stock and arcee_fusion merge large tensors in row slices (``SliceStatsMethod``): the
sliced merge is bit-identical to the whole-tensor merge, and both still match mergekit 0.1.5
on tensors large enough to be sliced with the default slice size."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking
from mergeops.methods.base import SliceStatsMethod, get_method
from mergeops.ops.fusion import quartile_indices, quartiles_in_place
from mergeops.ops.stock import model_stock
from tests.mergeops.test_slice_stats import (
    _family,
    assert_sliced_matches_whole,
)

CASES: list[tuple[str, int, dict[str, Any]]] = [
    ("model_stock", 3, {}),
    ("model_stock", 2, {}),
    ("model_stock", 3, {"filter_wise": True}),
    ("arcee_fusion", 1, {}),
]


@pytest.mark.parametrize(("method", "count", "params"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sliced_merge_matches_whole(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    count: int,
    params: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    family = _family(dtype, count)
    assert isinstance(get_method(method), SliceStatsMethod)
    whole = assert_sliced_matches_whole(monkeypatch, method, family[1:], family[0], **params)
    base = family[0]["embed"].float()
    assert not torch.equal(whole["embed"].float(), base)  # the merge did move the tensor


def _large(dtype: torch.dtype, count: int, rows: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(rows, 1024, generator=gen)
    shared = 0.3 * torch.randn(rows, 1024, generator=gen)  # correlated task vectors
    models = [base + shared + 0.2 * torch.randn(rows, 1024, generator=gen) for _ in range(count)]
    return base.to(dtype), [model.to(dtype) for model in models]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_model_stock_of_a_large_tensor_matches_mergekit(dtype: torch.dtype) -> None:
    """Over 1M entries, in row slices, computed in float32 on both sides. mergekit takes each
    task vector's norm in one float32 torch call, good to only ~1e-5 at 1M entries, so its t
    is off in the fifth digit; ours comes from the float64 Gram and is t rounded once. The
    check: ours is within 2e-7 (relative, floored at the largest magnitude) of the exact
    result (mergekit's formula in float64), and within mergekit's own error of mergekit's."""
    from mergekit.merge_methods.api import merge_tensors

    base, models = _large(dtype, 3, 1100)
    assert chunking.rows_for(get_method("model_stock"), (1100, 1024)) == 512
    inputs = [base.float(), *(m.float() for m in models)]
    theirs = merge_tensors(inputs, "model_stock", parameters={}, base_index=0)
    exact = model_stock(inputs[0].double(), [m.double() for m in inputs[1:]])
    ours = mergeops.merge("model_stock", [{"w": m} for m in models], base={"w": base},
                          device="cpu", dtype="float32")["w"]  # fmt: skip
    scale = float(theirs.abs().max())
    assert float((ours.double() - exact).abs().max()) <= 2e-7 * scale
    mergekit_error = float((theirs.double() - exact).abs().max())
    assert float((ours - theirs).abs().max()) <= mergekit_error + 2e-7 * scale
    assert not torch.equal(ours, base.float())


def test_model_stock_in_bfloat16_keeps_mergekits_formula() -> None:
    """A ``dtype: bfloat16`` config computes in bfloat16 and is never sliced: mergekit's
    whole-tensor reduction in that dtype, bit for bit, even over 1M entries."""
    from mergekit.merge_methods.api import merge_tensors

    base, models = _large(torch.bfloat16, 3, 1100)
    theirs = merge_tensors([base, *models], "model_stock", parameters={}, base_index=0)
    ours = mergeops.merge("model_stock", [{"w": m} for m in models], base={"w": base},
                          device="cpu", compute_dtype="bfloat16")  # fmt: skip
    assert torch.equal(ours["w"], theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_arcee_fusion_of_a_large_tensor_matches_mergekit(dtype: torch.dtype) -> None:
    """960 x 1024 is sliced (512 rows a slice) yet under mergekit's 1M-entry quantile sample,
    so mergekit's quartiles are exact too: equal bit for bit. (Above 1M entries mergekit
    samples its quartiles at random: no exact comparison is possible there.) Computed in
    float32 on both sides; ckreg writes the inputs' dtype."""
    from mergekit.merge_methods.api import merge_tensors

    base, (model,) = _large(dtype, 1, 960)
    assert chunking.rows_for(get_method("arcee_fusion"), (960, 1024)) == 512
    inputs = [base.float(), model.float()]  # float32 compute, ckreg's default
    theirs = merge_tensors(inputs, "arcee_fusion", parameters={}, base_index=0)
    ours = mergeops.merge("arcee_fusion", [{"w": model}], base={"w": base}, device="cpu")
    assert torch.equal(ours["w"], theirs.to(dtype))
    kept = ours["w"] == model
    assert 0 < int(kept.sum()) < kept.numel() // 2  # some, not most, changes kept


def test_quartiles_in_place_are_exact_order_statistics() -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(-50, 50, (10_001,), generator=gen).float()  # many ties
    expected = values.sort().values[list(quartile_indices(values.numel()))]
    buffer = values.clone()
    assert torch.equal(quartiles_in_place(buffer), expected)
    assert torch.equal(buffer.sort().values, values.sort().values)  # permuted, not changed
    assert quartile_indices(1) == (0, 0, 0) and quartile_indices(9) == (2, 4, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("method", "count", "params"), CASES)
def test_sliced_merge_on_cuda_matches_cpu(
    monkeypatch: pytest.MonkeyPatch, method: str, count: int, params: dict[str, Any]
) -> None:
    """The device path (kthvalue quartiles, block reductions on the GPU): within 1e-5."""
    family = _family(torch.float32, count)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    cpu = mergeops.merge(method, family[1:], base=family[0], device="cpu", **params)
    gpu = mergeops.merge(method, family[1:], base=family[0], device="cuda", **params)
    for key, tensor in cpu.items():
        scale = float(tensor.abs().max())
        assert float((gpu[key] - tensor).abs().max()) <= 1e-5 * scale, key
