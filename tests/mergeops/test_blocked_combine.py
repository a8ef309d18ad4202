"""The blocked task-vector combine (``ops.blocked_combine``) is bit-identical to the stacked
reference (``ops.sign_consensus.stacked_combine``) for every dtype, switch and thread count,
and whole task-vector merges do not change with it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import mergeops
from mergeops.ops import blocked_combine as bc
from mergeops.ops import sign_consensus
from mergeops.ops.sign_consensus import combine_task_vectors, stacked_combine


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().view(-1)
    return flat.view(torch.int32 if tensor.dtype == torch.float32 else torch.int16)


def _inputs(
    count: int, numel: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=gen).to(dtype)
    base[::13] = -0.0
    taus = []
    for _ in range(count):
        tau = (torch.randn(numel, generator=gen) * 0.01).to(dtype)
        tau[::7], tau[3::11] = 0.0, -0.0  # zeros never agree; signed zeros reach the sums
        taus.append(tau)
    weights = [0.3 + 0.2 * t for t in range(count)]
    if count > 1:
        weights[1] = -weights[0]  # weights that cancel: the zero-divisor rule
    return base, taus, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("count", [1, 3, 16])
@pytest.mark.parametrize("consensus", [False, True])
def test_blocked_equals_stacked_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, count: int, consensus: bool
) -> None:
    monkeypatch.setattr(bc, "BLOCK", 256)  # several blocks and a short last one
    base, taus, weights = _inputs(count, 256 * 3 + 64, dtype, seed=count)
    assert bc.blockable(base, taus)
    for normalize in (False, True):
        for scale in (1.0, 0.7):
            switches: dict[str, Any] = {"consensus": consensus, "normalize": normalize,
                                        "scale": scale}  # fmt: skip
            expected = _bits(stacked_combine(base, taus, weights, **switches))
            got = bc.blocked_combine(base, taus, weights, **switches)
            assert got.dtype == dtype
            assert torch.equal(_bits(got), expected), switches


@pytest.mark.parametrize("consensus", [False, True])
def test_blocked_identical_with_one_and_two_threads(consensus: bool) -> None:
    base, taus, weights = _inputs(4, bc.BLOCK + 4096, torch.float32, seed=9)
    expected = _bits(stacked_combine(base, taus, weights, consensus=consensus,
                                     normalize=True, scale=0.5))  # fmt: skip
    for threads in (1, 2):
        with _threads(threads):
            got = combine_task_vectors(base, taus, weights, consensus=consensus,
                                       normalize=True, scale=0.5)  # fmt: skip
        assert torch.equal(_bits(got), expected), threads


def test_inputs_outside_the_blocked_rule_use_the_reference() -> None:
    odd, odd_taus, weights = _inputs(2, 100, torch.float32, seed=1)  # not a multiple of 64
    many, many_taus, many_weights = _inputs(17, 128, torch.float32, seed=2)  # > 16 terms
    mixed = [odd_taus[0], odd_taus[1].to(torch.float64)]
    assert not bc.blockable(odd, odd_taus)
    assert not bc.blockable(many, many_taus)
    assert not bc.blockable(odd, mixed)
    for base, taus, w in ((odd, odd_taus, weights), (many, many_taus, many_weights)):
        got = combine_task_vectors(base, taus, w, consensus=True, normalize=True, scale=1.0)
        ref = stacked_combine(base, taus, w, consensus=True, normalize=True, scale=1.0)
        assert torch.equal(_bits(got), _bits(ref))


_METHODS = {
    "task_arithmetic": ({"lambda": 0.8}, {}),
    "ties": ({}, {"density": 0.5}),
    "dare_ties": ({}, {"density": 0.6}),
    "dare_linear": ({}, {"density": 0.6}),
    "della": ({}, {"density": 0.6, "epsilon": 0.1}),
    "breadcrumbs_ties": ({}, {"density": 0.5, "gamma": 0.05}),
}


def _family() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)

    def model(scale: float) -> dict[str, torch.Tensor]:
        return {  # chunked (> 2 MiB float32), whole (several blocks), small, non-floating
            "big": (torch.randn(520, 1024, generator=gen) * scale).to(torch.bfloat16),
            "mid": (torch.randn(160, 1024, generator=gen) * scale).to(torch.bfloat16),
            "norm": torch.randn(1024, generator=gen) * scale,
            "ids": torch.arange(8),
        }

    base = model(1.0)
    return base, [{k: base[k] + model(0.01)[k] for k in base} for _ in range(3)]


@pytest.mark.parametrize("method", sorted(_METHODS))
def test_merges_unchanged_by_blocking_and_threads(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    base, models = _family()
    params, per_model = _METHODS[method]
    weights = (1.0, 0.5, -0.25)

    def merge() -> dict[str, torch.Tensor]:
        return mergeops.merge(method, models, base=base, **params,
                              model_params=[{"weight": w, **per_model} for w in weights])  # fmt: skip

    calls = []
    blocked = sign_consensus.blocked_combine
    monkeypatch.setattr(sign_consensus, "blocked_combine",
                        lambda *a, **k: calls.append(1) or blocked(*a, **k))  # fmt: skip
    runs = []
    for threads in (1, 2):
        with _threads(threads):
            runs.append(merge())
    assert calls  # the blocked combine ran
    monkeypatch.setattr(sign_consensus, "blockable", lambda *_: False)
    runs.append(merge())  # the stacked reference
    for key in runs[0]:
        raw = [r[key].contiguous().view(-1).view(torch.uint8) for r in runs]
        assert torch.equal(raw[0], raw[1]) and torch.equal(raw[0], raw[2]), (method, key)
