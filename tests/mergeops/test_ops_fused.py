"""Linear's division folded into the blocked weighted sum: the same bits as dividing the
stacked reference sum afterwards, with 1 or 2 threads."""

from __future__ import annotations

import pytest
import torch

from mergeops.ops import basic


def _reference(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=torch.float32).reshape(-1, *([1] * tensors[0].dim()))
    return (stacked * w).sum(dim=0) / float(sum(weights))


@pytest.mark.parametrize("numel", [64, 64 * 1024, 3 * 64 * 1024 + 640])
@pytest.mark.parametrize("weights", [[1.0, 0.8, 0.6, 0.4], [0.3, 0.3, 0.3], [2.0, -0.7]])
def test_weighted_average_divides_per_block_bit_for_bit(numel: int, weights: list[float]):
    g = torch.Generator().manual_seed(numel)
    tensors = [torch.randn(numel, generator=g) for _ in weights]
    tensors[0][::7] = -0.0
    reference = _reference(tensors, weights).view(torch.int32)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            merged = basic.weighted_average(tensors, weights)
            assert torch.equal(merged.view(torch.int32), reference), threads
    finally:
        torch.set_num_threads(before)


def test_weighted_average_outside_the_blocked_rule_and_zero_sum() -> None:
    tensors = [torch.randn(10), torch.randn(10)]  # length not a multiple of 64: reference
    assert torch.equal(basic.weighted_average(tensors, [1.0, 3.0]), _reference(tensors, [1.0, 3.0]))
    with pytest.raises(ValueError, match=r"weights sum to 0\.0"):
        basic.weighted_average(tensors, [1.0, -1.0])
