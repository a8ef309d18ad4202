"""The CPU finite check (sum first, exact ``aminmax`` only when the sum is not finite) gives
the same answer as the exact check: overflowing sums of finite values are finite, one NaN or
Inf anywhere is not."""

from __future__ import annotations

import pytest
import torch

from mergeops import finite


def _exact(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 4095, 100_000])
def test_sum_first_check_agrees_with_the_exact_one(
    dtype: torch.dtype, bad: float | None, where: int
) -> None:
    big = torch.finfo(dtype).max / 2
    tensor = torch.full((100_001,), big, dtype=dtype)  # the sum overflows: finite values
    tensor[::3] = -big / 3
    if bad is not None:
        tensor[where] = bad
    assert _exact(tensor) == (bad is None)
    assert finite.all_finite(tensor) == (bad is None)
    assert bool(finite.input_flag(tensor)) == (bad is None)


def test_opposite_infinities_and_empty_tensors() -> None:
    assert not finite.all_finite(torch.tensor([float("inf"), -float("inf"), 1.0]))
    assert finite.all_finite(torch.empty(0))
    assert finite.all_finite(torch.arange(5))  # integers are always finite
