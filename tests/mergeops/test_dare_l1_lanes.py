"""DARE's L1 rescale by lane sums (``ops.prune.lane_sums``, ``kernels/dare.c``): the kernels
give the torch reference's bits, the factor does not depend on slicing or the thread count and
is the correctly rounded ratio, and a chunked merge equals the whole one with the kernels on
and off."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking, kernel_settings, kernels
from mergeops.methods.task_vector.dare import DareL1Rows
from mergeops.ops.lanes import LANES, lane_cumsum, lane_sums
from mergeops.ops.packed_cut import pack_bool
from mergeops.ops.prune import l1_factor
from tests.mergeops.kernel_calls import count_kernel_calls

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


def _kernels(on: bool) -> None:
    kernel_settings.configure(enabled=on)
    assert (kernels.library() is not None) == on


def _case(seed: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(numel, generator=g) * 0.02).bfloat16().float()
    tau = torch.randn(numel, generator=g) * 10.0 ** torch.randint(-6, 1, (numel,), generator=g)
    tau[torch.rand(numel, generator=g) < 0.2] = 0.0
    return base, base + tau


@pytest.mark.parametrize("numel", [5, 8, 64 * 37, 64 * 37 + 3])
def test_lane_sums_kernel_gives_the_cumsum_bits(kernel_dir: Path, numel: int) -> None:
    values = _case(numel, numel)[1].abs()
    got, ref = torch.zeros(LANES, dtype=torch.float64), torch.zeros(LANES, dtype=torch.float64)
    for lanes, on in ((got, True), (ref, False)):
        _kernels(on)
        for start in range(0, numel, 64 * 5):  # slices starting at multiples of 8
            lane_sums(values[start : start + 64 * 5], lanes)
    assert torch.equal(got, ref)
    exact = [math.fsum(values[k::LANES].double().tolist()) for k in range(LANES)]
    assert torch.allclose(got, torch.tensor(exact, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("numel", [64 * 300, 64 * 300 + 5])
def test_dare_sweep_kernel_gives_the_torch_bits(kernel_dir: Path, numel: int) -> None:
    base, model = _case(3, numel)
    results = []
    for on in (True, False):
        _kernels(on)
        rows = DareL1Rows(lambda: torch.Generator().manual_seed(11), 0.3, numel)
        for start in range(0, numel, 64 * 7):
            rows.observe(model[start : start + 64 * 7], base[start : start + 64 * 7], start)
        results.append((rows.bits.clone(), rows.lanes.clone(), rows.result()[1]))
    (bits, lanes, factor), (ref_bits, ref_lanes, ref_factor) = results
    assert torch.equal(bits, ref_bits) and torch.equal(lanes, ref_lanes)
    assert factor is not None and ref_factor is not None and torch.equal(factor, ref_factor)
    # the mask is that of one rand call; the factor the correctly rounded exact ratio
    keep = torch.rand(numel, generator=torch.Generator().manual_seed(11)) < 0.3
    assert torch.equal(bits, pack_bool(keep))
    magnitude = (model - base).abs().double()
    exact = math.fsum(magnitude.tolist()) / math.fsum((magnitude * keep).tolist())
    f32_ulp = torch.finfo(torch.float32).eps * 2.0 ** math.floor(math.log2(exact))
    assert abs(factor.item() - exact) <= 0.5 * f32_ulp * (1 + 1e-6)  # correctly rounded


def test_dare_apply_kernel_gives_the_torch_bits(kernel_dir: Path) -> None:
    base, model = _case(4, 64 * 50 + 3)
    keep = torch.rand(model.numel(), generator=torch.Generator().manual_seed(2)) < 0.4
    bits = pack_bool(keep)
    for scale in (1.0, 2.3456789):
        fused = model.clone()
        assert kernels.dare_apply(fused, base, bits, scale)
        ref = (model - base).mul_(keep).mul_(torch.tensor(scale, dtype=torch.float32))
        assert torch.equal(fused.view(torch.int32), ref.view(torch.int32))
    offset = 64 * 10  # a later slice reads its own bytes
    fused = model[offset:].clone()
    assert kernels.dare_apply(fused, base[offset:], bits[offset // 8 :], 1.0)
    assert torch.equal(fused, (model - base)[offset:] * keep[offset:])


def test_the_l1_factor_does_not_follow_the_thread_count() -> None:
    """torch's float32 sum of 32M entries rounds differently on 1, 2 and 4 threads; the lane
    sums do not."""
    base, model = _case(6, 1 << 22)
    keep = torch.rand(model.numel(), generator=torch.Generator().manual_seed(1)) < 0.5
    threads = torch.get_num_threads()
    factors = []
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)
            factors.append(l1_factor((model - base).abs(), keep))
    finally:
        torch.set_num_threads(threads)
    assert all(f is not None and torch.equal(f, factors[0]) for f in factors)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_a_chunked_l1_dare_equals_the_whole_one_with_kernels_on_and_off(
    kernel_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(96, 128, generator=g)}
    models = [{"w": base["w"] + torch.randn(96, 128, generator=g) * s} for s in (1.0, 0.1)]
    params: dict[str, Any] = {"density": [0.4, 0.7], "seed": 5, "rescale_by": "l1"}
    whole = mergeops.merge(method, models, base=base, device="cpu", **params)["w"]
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    calls = count_kernel_calls(monkeypatch, ["dare_sweep", "dare_apply"])
    for on in (True, False):
        _kernels(on)
        chunked = mergeops.merge(method, models, base=base, device="cpu", **params)["w"]
        assert torch.equal(whole.view(torch.int32), chunked.view(torch.int32)), on
    assert calls["dare_sweep"] >= 2 * 3 and calls["dare_apply"] >= 2 * 3  # 2 models, 3 slices


def test_lane_sums_of_bfloat16_values_take_float32_pieces(kernel_dir: Path) -> None:
    values = _case(7, (1 << 20) + 64 * 3 + 5)[1].abs().bfloat16()
    fast = torch.zeros(LANES, dtype=torch.float64)
    lane_sums(values, fast)
    reference = torch.zeros(LANES, dtype=torch.float64)
    lane_cumsum(values, reference)
    assert torch.equal(fast, reference)


def test_a_failed_sweep_leaves_no_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN in a late slice fails the L1 sweep; its model threads are shut down with it
    (``TensorStatsPass.close``), not left for the garbage collector."""
    import threading

    from mergeops.methods.base import MergeError

    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(96, 128, generator=g)}
    models = [{"w": base["w"] + torch.randn(96, 128, generator=g)} for _ in range(2)]
    models[1]["w"][90, 3] = float("nan")  # in the last slice
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    monkeypatch.setattr("mergeops.methods.task_vector.dare.available_cores", lambda: 2)
    started: list[str] = []
    real = DareL1Rows.observe

    def observe(self: DareL1Rows, *args: Any) -> None:
        started.append(threading.current_thread().name)
        real(self, *args)

    monkeypatch.setattr(DareL1Rows, "observe", observe)
    params: dict[str, Any] = {"density": 0.5, "seed": 5, "rescale_by": "l1"}
    with pytest.raises(MergeError, match="NaN or Inf"):
        mergeops.merge("dare_linear", models, base=base, device="cpu", **params)
    assert any(name.startswith("ckreg-mask") for name in started)  # the pool did run
    alive = [t.name for t in threading.enumerate() if t.name.startswith("ckreg-mask")]
    assert alive == []


@pytest.mark.parametrize("numel", [5, 64 * 301 + 3, (1 << 20) * 2 + 77])
def test_the_blocked_l1_factor_of_tau_equals_the_whole_one(
    monkeypatch: pytest.MonkeyPatch, numel: int
) -> None:
    """DELLA's factor from τ by blocks (no whole |τ| copy) has the bits of ``l1_factor`` on
    the whole |τ|, also with blocks that are not a multiple of the tensor's rows."""
    from mergeops.ops import prune

    gen = torch.Generator().manual_seed(numel % 97)
    tau = torch.randn(numel, generator=gen) * 0.01
    keep = torch.rand(numel, generator=gen) < 0.4
    whole = l1_factor(tau.abs(), keep)
    assert whole is not None
    for block in (prune.L1_BLOCK, 1024):
        monkeypatch.setattr(prune, "L1_BLOCK", block)
        blocked = prune.l1_factor_of_tau(tau, keep)
        assert blocked is not None and torch.equal(blocked, whole), block
    assert prune.l1_factor_of_tau(torch.zeros(16), torch.ones(16, dtype=torch.bool)) is None
