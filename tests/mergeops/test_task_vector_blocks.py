"""Task-vector ``merge_rows`` in cache-sized blocks of rows: the same bits as one block per
slice and as the whole-tensor merge, with 1 or 2 threads."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mergeops
from mergeops import kernel_settings
from mergeops.methods.task_vector import task_arithmetic

_METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "task_arithmetic": ({}, {}),
    "ties": ({}, {"density": 0.4}),
    "breadcrumbs_ties": ({"tie_break": "mergekit"}, {"density": 0.5, "gamma": 0.05}),
    "della": ({}, {"density": 0.6, "epsilon": 0.1}),
    "dare_ties": ({}, {"density": 0.6}),
}


def _family() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(11)

    def model(scale: float) -> dict[str, torch.Tensor]:  # "big": merged in row slices
        return {"big": (torch.randn(530, 1024, generator=gen) * scale).to(torch.bfloat16)}

    base = model(1.0)
    return base, [{k: base[k] + model(0.01)[k] for k in base} for _ in range(3)]


@pytest.mark.parametrize("method", sorted(_METHODS))
def test_blocks_of_rows_change_no_bit(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, method: str
) -> None:
    base, models = _family()
    params, per_model = _METHODS[method]

    def merge(threads: int) -> torch.Tensor:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            merged = mergeops.merge(method, models, base=base, seed=5, dtype="float32", **params,
                                    model_params=[{"weight": w, **per_model}
                                                  for w in (1.0, 0.5, -0.25)])  # fmt: skip
        finally:
            torch.set_num_threads(before)
        return merged["big"].view(-1).view(torch.int32)

    request.addfinalizer(kernel_settings.reset)
    kernel_settings.configure(enabled=False)  # the torch path's blocks (fused: below)
    calls: list[int] = []
    combine = task_arithmetic.TaskVectorMerge._combine
    monkeypatch.setattr(task_arithmetic.TaskVectorMerge, "_combine",
                        lambda *a, **k: calls.append(1) or combine(*a, **k))  # fmt: skip
    monkeypatch.setattr(task_arithmetic, "ROWS_BLOCK", 1 << 40)  # one block per slice
    reference = merge(1)
    assert len(calls) == 2  # two row slices: 512 + 18 rows
    monkeypatch.setattr(task_arithmetic, "ROWS_BLOCK", 100 * 1024)  # 100 rows per block
    assert torch.equal(merge(1), reference)
    assert len(calls) == 2 + 7  # 6 blocks + 1
    assert torch.equal(merge(2), reference)
    kernel_settings.configure(enabled=True)  # the fused kernels, where there is a compiler
    assert torch.equal(merge(1), reference)


def test_merge_rows_of_rows_without_entries_and_odd_rows() -> None:
    """Rows of 0 entries or not lane-aligned take the one-block path (no division by 0)."""
    from mergeops.methods.base import MergeContext, TensorInputs
    from mergeops.methods.task_vector.task_arithmetic import (
        TaskArithmetic,
        TaskArithmeticParams,
        TaskWeightParams,
    )

    ctx = MergeContext(method="task_arithmetic", model_names=["a", "b"],
                       params=TaskArithmeticParams(), device=torch.device("cpu"), has_base=True,
                       model_params=[TaskWeightParams(weight=1.0), TaskWeightParams(weight=0.5)])  # fmt: skip
    for shape in [(4, 0), (3, 5)]:
        base = torch.ones(shape)
        models = [torch.full(shape, 2.0), torch.full(shape, 3.0)]
        inputs = TensorInputs(name="w", models=models, base=base)
        merged = TaskArithmetic().merge_rows(inputs, [None, None], 0, ctx)
        assert merged.shape == shape and bool((merged == 3.0).all())
