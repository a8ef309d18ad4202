"""``kernels.sort_windows``: torch's own CPU sort algorithm run only where it reaches the wanted
positions, for mergekit's tie rule. Checked against ``torch.sort`` itself: the indices at every
window's positions must be the ones torch's unstable sort puts there."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from mergeops import kernel_settings, kernels
from mergeops.ops.selection import topk_cut_by, window_cut

if not (shutil.which("cc") or shutil.which("gcc")) and os.environ.get("CI") != "true":
    pytest.skip("no C compiler: the fused kernels are off here", allow_module_level=True)


pytestmark = pytest.mark.usefixtures("kernel_dir")  # kernels on, in a fresh folder


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``kernels.<name>`` (still calling it); the list grows per call."""
    calls: list[int] = []
    real = getattr(kernels, name)

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, counted)
    return calls


def _keys(gen: torch.Generator, n: int, kind: str) -> torch.Tensor:
    if kind == "few":  # a handful of values: huge tie groups everywhere
        return torch.randint(0, 5, (n,), generator=gen).float() * 0.25
    if kind == "bf16":  # |τ| of bf16 checkpoints: differences of 8-bit significands
        a = torch.randn(n, generator=gen).bfloat16().float()
        return (a - torch.randn(n, generator=gen).bfloat16().float()).abs()
    return torch.rand(n, generator=gen)  # nearly distinct


@pytest.mark.parametrize("kind", ["few", "bf16", "distinct"])
@pytest.mark.parametrize("descending", [True, False])
def test_window_positions_hold_what_torch_sort_puts_there(kind: str, descending: bool) -> None:
    gen = torch.Generator().manual_seed(len(kind) * 2 + descending)
    for n in [1, 2, 15, 16, 17, 33, 100, 1000, 4099, 70_000]:
        keys = _keys(gen, n, kind)
        expected = torch.sort(keys, descending=descending).indices
        a = int(torch.randint(0, n, (1,), generator=gen))
        b = int(torch.randint(a, n + 1, (1,), generator=gen))
        c = int(torch.randint(0, n, (1,), generator=gen))
        windows = [(a, b), (c, min(n, c + 20)), (0, min(n, 3)), (n - 1, n)]
        work = keys.clone()
        got = kernels.sort_windows(work, windows, descending=descending)
        assert got is not None
        for first, last in windows:
            assert torch.equal(got[first:last], expected[first:last]), (n, first, last)
            assert torch.equal(work[first:last], keys[got[first:last]])
        assert torch.equal(got.sort().values, torch.arange(n))  # a permutation


def _shaped(gen: torch.Generator, n: int, shape: str) -> torch.Tensor:
    if shape == "equal":  # every entry stops both scans: a swap per pair
        return torch.full((n,), 0.5)
    if shape == "ascending":
        return torch.arange(n, dtype=torch.float32)
    if shape == "descending":
        return torch.arange(n, 0, -1, dtype=torch.float32)
    if shape == "runs":  # long runs of stops, then none
        return (torch.arange(n) // 100 % 7).float()
    return _keys(gen, n, "bf16")


@pytest.mark.parametrize("shape", ["equal", "ascending", "descending", "runs", "bf16"])
@pytest.mark.parametrize("descending", [True, False])
def test_whole_order_equals_torch_sort_around_the_block_scans(shape: str, descending: bool) -> None:
    """The partition collects both scans' stops 128 entries at a time while two blocks are left
    between them, then finishes entry by entry: one window over every position (the whole
    algorithm) gives torch.sort's own permutation, for ranges just under, at and over those
    sizes and for orders that stop every entry or none."""
    gen = torch.Generator().manual_seed(len(shape) + descending)
    for n in [255, 256, 257, 383, 384, 385, 511, 512, 513, 1000, 5000, 40_000]:
        keys = _shaped(gen, n, shape)
        work = keys.clone()
        got = kernels.sort_windows(work, [(0, n)], descending=descending)
        assert got is not None
        assert torch.equal(got, torch.sort(keys, descending=descending).indices), n
        assert torch.equal(work, keys[got])


def test_out_of_depth_restores_the_keys_and_the_cut_falls_back() -> None:
    """Where std::sort would switch to heapsort inside a window, the call gives up with the
    keys back in their order, and the mergekit-rule cut then runs the whole torch.sort."""
    gen = torch.Generator().manual_seed(3)
    keys = _keys(gen, 5000, "few")
    work = keys.clone()
    assert kernels.sort_windows(work, [(2000, 2100)], descending=True, depth=1) is None
    assert torch.equal(work, keys)
    assert kernels.sort_windows(work, [(0, 1)] * 5, descending=True) is None  # too many
    assert torch.equal(work, keys)


def test_keys_with_a_nan_are_refused_untouched_and_the_cut_sorts_in_full() -> None:
    """A NaN has no place in the kernels' comparisons: the calls give up before moving a key,
    and the mergekit-rule cut takes torch.sort's own order instead (NaN sorts first there)."""
    gen = torch.Generator().manual_seed(5)
    keys = _keys(gen, 4096, "few")
    keys[1234] = float("nan")
    work = keys.clone()
    assert kernels.sort_windows(work, [(100, 900)], descending=True) is None
    assert kernels.nth_element(work, 2000, descending=True) is None
    assert torch.equal(work.isnan(), keys.isnan())
    assert torch.equal(work.nan_to_num(), keys.nan_to_num())
    cut = topk_cut_by(keys.reshape(64, 64), 0.5, "mergekit")
    threshold = torch.sort(keys, descending=True).values[2047]
    expected = torch.sort(keys, descending=True).indices[:2048]
    assert cut is not None and cut.threshold == threshold
    assert torch.equal(cut.ties, expected[keys[expected] == threshold].sort().values)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_mergekit_rule_cuts_equal_the_whole_sort(
    density: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIES's top-k and breadcrumbs' window under mergekit's rule: the same kept ties with the
    windowed sort as with the whole ``torch.sort`` (kernels off), and the kernel was used."""
    gen = torch.Generator().manual_seed(int(density * 10))
    magnitude = _keys(gen, 64 * 1024, "few").reshape(64, 1024)
    calls = _counting(monkeypatch, "sort_windows")
    top = topk_cut_by(magnitude, density, "mergekit")
    window = window_cut(magnitude, 1000, 1000 + int(density * 60_000), "mergekit")
    assert len(calls) == 2 and top is not None and window is not None
    kernel_settings.configure(enabled=False)
    plain_top = topk_cut_by(magnitude, density, "mergekit")
    plain_window = window_cut(magnitude, 1000, 1000 + int(density * 60_000), "mergekit")
    assert plain_top is not None and plain_window is not None
    assert torch.equal(top.ties, plain_top.ties) and top.ties.numel() > 0
    assert torch.equal(window.ties, plain_window.ties) and window.ties.numel() > 0


@pytest.mark.parametrize("kind", ["few", "bf16", "distinct"])
def test_nth_element_selects_what_torch_topk_selects(kind: str) -> None:
    """For k·64 > n torch.topk selects with std::nth_element on the CPU: ``nth_element``'s first
    k indices are the set topk returns, ties at the k-th value included."""
    gen = torch.Generator().manual_seed(len(kind))
    for n in [2, 3, 4, 5, 17, 100, 1000, 4099, 70_000]:
        keys = _keys(gen, n, kind)
        for k in {1 + n // 63, n // 2 or 1, n}:
            expected = torch.topk(keys, k, largest=True, sorted=False).indices
            work = keys.clone()
            order = kernels.nth_element(work, k - 1, descending=True)
            assert order is not None
            assert torch.equal(order[:k].sort().values, expected.sort().values), (n, k)
    work = keys.clone()
    assert kernels.nth_element(work, 10, descending=True, depth=1) is None
    assert torch.equal(work, keys)  # restored


def test_sce_selection_equals_torch_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """SCE's top-variance mask with the selection kernel equals the ``torch.topk`` mask."""
    from mergeops.ops.sce import top_variance

    gen = torch.Generator().manual_seed(9)
    variance = _keys(gen, 64 * 1000, "few").reshape(64, 1000)  # ties at the cut
    calls = _counting(monkeypatch, "nth_element")
    fast = top_variance(variance.clone(), 0.5)
    kernel_settings.configure(enabled=False)
    plain = top_variance(variance.clone(), 0.5)
    assert calls == [1, 1] and torch.equal(fast, plain)
    assert int(fast.sum()) == int(torch.count_nonzero(variance) * 0.5)
