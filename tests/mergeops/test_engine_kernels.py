"""The blocked in-place weighted sum rounds every element as the stacked reference does, with
any thread count, and the engine's linear merges are unchanged by it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import mergeops
from mergeops.ops import basic


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _reference(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(tensors)
    return (stacked * basic._weights_like(weights, tensors[0])).sum(dim=0)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


@pytest.mark.parametrize("count", [1, 2, 4, 5, 16])
@pytest.mark.parametrize("shape", [(64,), (3, 64), (300, 1024), (basic.BLOCK + 64,)])
def test_blocked_sum_equals_the_stacked_reference_bit_for_bit(
    count: int, shape: tuple[int, ...]
) -> None:
    gen = torch.Generator().manual_seed(count * 1000 + shape[0])
    tensors = [torch.randn(shape, generator=gen) * 10.0**i for i in range(count)]
    for tensor in tensors:
        tensor.view(-1)[::7] = -0.0  # signed zeros: the reference starts from +0
    weights = [float(w) for w in torch.rand(count, generator=gen) * 2 - 0.5]
    expected = _bits(_reference(tensors, weights))
    for threads in (1, 2):
        with _threads(threads):
            got = basic.blocked_weighted_sum(tensors, weights)
        assert torch.equal(_bits(got), expected), (count, shape, threads)


def test_shapes_outside_the_blocked_rule_use_the_reference() -> None:
    tensors = [torch.randn(3, 5) for _ in range(5)]  # 15 elements: not a multiple of 64
    weights = [0.3, -0.2, 1.0, 0.7, 0.1]
    assert torch.equal(
        _bits(basic.weighted_sum(tensors, weights)), _bits(_reference(tensors, weights))
    )
    many = [torch.randn(128) for _ in range(18)]  # torch splits 18 terms over accumulators
    assert torch.equal(
        _bits(basic.weighted_sum(many, [0.5] * 18)), _bits(_reference(many, [0.5] * 18))
    )


def test_linear_merge_identical_with_one_and_two_threads() -> None:
    gen = torch.Generator().manual_seed(5)
    models = [
        {"w": torch.randn(512, 1024, generator=gen).to(torch.bfloat16), "b": torch.randn(64)}
        for _ in range(3)
    ]
    results = []
    for threads in (1, 2):
        with _threads(threads):
            merged = mergeops.merge(
                "linear", models, model_params=[{"weight": w} for w in (1.0, 0.5, 0.25)]
            )
        results.append(merged)
    assert results[0].keys() == results[1].keys() == {"w", "b"}
    for key in results[0]:
        raw = [r[key].contiguous().view(-1).view(torch.uint8) for r in results]
        assert torch.equal(raw[0], raw[1]), key


def test_chunkable_cpu_merges_leave_a_core_to_readers_and_restore_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An elementwise (chunkable) merge computes with one thread fewer than torch's setting
    (the reader and writer threads run beside it); a non-chunkable method keeps them all; the
    setting is back afterwards, also after a failed merge."""
    from mergeops.methods.task_vector.task_arithmetic import TaskArithmetic

    seen: list[int] = []
    merge_tensor = TaskArithmetic.merge_tensor

    def spy(self: TaskArithmetic, inputs, ctx):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return merge_tensor(self, inputs, ctx)

    monkeypatch.setattr(TaskArithmetic, "merge_tensor", spy)
    base = {"w": torch.zeros(4, 4)}
    models = [{"w": torch.ones(4, 4)}, {"w": torch.full((4, 4), 2.0)}]
    with _threads(2):
        mergeops.merge("task_arithmetic", models, base=base, device="cpu")
        assert seen == [1] and torch.get_num_threads() == 2
        with pytest.raises(mergeops.MergeError):
            mergeops.merge("task_arithmetic", [{"w": torch.full((4, 4), float("nan"))}],
                           base=base, device="cpu")  # fmt: skip
        assert torch.get_num_threads() == 2
        merged = mergeops.merge("karcher", models, device="cpu")  # not chunkable: unchanged
        assert torch.get_num_threads() == 2 and merged["w"].shape == (4, 4)
