"""mergekit's task-vector methods in ckreg (breadcrumbs, della, sce, ram) and the mergekit
options of ties/dare: hand-computed results on tiny tensors, reductions, seeded statistics,
chunked == whole, and bad input naming the model, tensor or parameter."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mergeops
from mergeops import chunking
from mergeops.methods.base import MergeError, get_method
from mergeops.ops.prune import della_keep_probability
from mergeops.ops.sce import select_mask
from mergeops.ops.selection import rank_window_mask, topk_mask_by, window_bounds


def _merge(method: str, taus: list[list[float]], **params: Any) -> torch.Tensor:
    """Merge models θ_t = τ_t over a zero base; the merged tensor."""
    base = {"w": torch.zeros(len(taus[0]))}
    models = [{"w": torch.tensor(tau)} for tau in taus]
    return mergeops.merge(method, models, base=base, device="cpu", **params)["w"]


def _close(got: torch.Tensor, expected: list[float]) -> None:
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6), got.tolist()


# ---- breadcrumbs ---------------------------------------------------------------------------
TAU = [5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, 6.0, -2.5, 1.5]


def test_breadcrumbs_drops_the_largest_and_the_smallest():
    # n 10, density 0.5 -> 5 kept, gamma 0.1 -> the largest (6) dropped: ascending ranks [4, 9)
    assert window_bounds(10, 0.5, 0.1) == (4, 9)
    out = _merge("breadcrumbs", [TAU], density=0.5, gamma=0.1)
    _close(out, [5.0, 0, 3.0, 0, -4.0, 2.0, 0, 0, -2.5, 0])


def test_breadcrumbs_ties_elects_signs_and_rescale_keeps_l1():
    # model 2 only disagrees at [0]; with density 1 nothing is pruned
    out = _merge("breadcrumbs_ties", [[2.0, 1.0], [-1.0, 1.0]], normalize=False)
    _close(out, [2.0, 2.0])
    rescaled = _merge("breadcrumbs", [TAU], density=0.5, gamma=0.1, rescale=True)
    kept = [5.0, 0, 3.0, 0, -4.0, 2.0, 0, 0, -2.5, 0]
    factor = sum(abs(x) for x in TAU) / sum(abs(x) for x in kept)
    _close(rescaled, [x * factor for x in kept])


def test_breadcrumbs_position_ties_follow_ascending_index_order():
    ones = torch.ones(4)
    assert rank_window_mask(ones, 2, 4, "position").tolist() == [False, False, True, True]
    assert rank_window_mask(ones, 1, 3, "position").tolist() == [False, True, True, False]
    assert not rank_window_mask(ones, 2, 2, "position").any()


@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.01), (0.5, 0.2), (0.9, 0.3), (0.05, 0.0)])
def test_breadcrumbs_window_matches_sort_references(density: float, gamma: float):
    gen = torch.Generator().manual_seed(9)
    tau = torch.randint(-6, 7, (997,), generator=gen).float() * 0.25  # many equal magnitudes
    lo, hi = window_bounds(tau.numel(), density, gamma)
    stable = torch.zeros(997, dtype=torch.bool)
    stable[torch.sort(tau.abs(), stable=True).indices[lo:hi]] = True
    assert torch.equal(rank_window_mask(tau.abs(), lo, hi, "position"), stable)
    import mergekit.sparsify as sparsify

    expected = sparsify.magnitude_outliers(tau, density, gamma=gamma) != 0
    got = rank_window_mask(tau.abs(), lo, hi, "mergekit") & (tau != 0)
    assert torch.equal(got, expected)


def test_breadcrumbs_density_one_is_task_arithmetic():
    taus = [TAU, [x * -0.5 for x in TAU]]
    ta = _merge("task_arithmetic", taus, weight=[0.7, 1.2], **{"lambda": 0.8})
    bc = _merge("breadcrumbs", taus, weight=[0.7, 1.2], **{"lambda": 0.8})
    assert torch.equal(ta, bc)


# ---- ties / dare under mergekit options ----------------------------------------------------
def test_ties_rescale_restores_the_l1_norm():
    # top-2 of |[3, -1, 2, 0.5]| kept; L1 6.5 / 5 = 1.3
    out = _merge("ties", [[3.0, -1.0, 2.0, 0.5]], density=0.5, rescale=True)
    _close(out, [3.9, 0.0, 2.6, 0.0])


def test_topk_tie_break_modes_both_keep_exactly_k():
    values = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])
    assert topk_mask_by(values, 0.4, "position").tolist() == [True, True, False, False, False]
    mergekit_like = topk_mask_by(values, 0.4, "mergekit")
    assert int(mergekit_like.sum()) == 2 and not bool(mergekit_like[3])
    expected = torch.zeros(5, dtype=torch.bool)
    expected[torch.argsort(values.abs(), descending=True)[:2]] = True
    assert torch.equal(mergekit_like, expected)


def test_dare_l1_rescale_keeps_the_l1_norm_exactly_and_the_mean_statistically():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(20000, generator=gen)
    base = {"w": torch.zeros(20000)}
    out = mergeops.merge(
        "dare_linear", [{"w": tau}], base=base, density=0.3, rescale_by="l1", device="cpu"
    )["w"]
    assert abs(float(out.abs().sum()) / float(tau.abs().sum()) - 1) < 1e-5
    assert abs(float((out != 0).float().mean()) - 0.3) < 0.02
    plain = mergeops.merge("dare_linear", [{"w": tau}], base=base, density=0.3, rescale=False)
    assert torch.equal(plain["w"], torch.where(out != 0, tau, torch.zeros_like(tau)))


def test_mergekit_defaults_name_what_a_mergekit_config_implies():
    assert get_method("ties").mergekit_defaults == {"density": 1.0, "tie_break": "mergekit"}  # type: ignore[attr-defined]
    assert get_method("dare_ties").mergekit_defaults["rescale_by"] == "l1"  # type: ignore[attr-defined]
    assert get_method("della").mergekit_defaults == {"rescale_by": "l1"}  # type: ignore[attr-defined]
    assert get_method("breadcrumbs").mergekit_defaults == {"tie_break": "mergekit"}  # type: ignore[attr-defined]
    assert get_method("sce").mergekit_defaults == {}  # type: ignore[attr-defined]


# ---- della ---------------------------------------------------------------------------------
def test_della_keep_probability_by_magnitude_rank():
    probs = della_keep_probability(torch.tensor([3.0, -1.0, 2.0]), 0.5, 0.1)
    assert torch.allclose(probs, torch.tensor([[0.6, 0.4, 0.5]]))
    single = della_keep_probability(torch.tensor([[3.0], [1.0]]), 0.5, 0.1)
    assert torch.allclose(single, torch.full((2, 1), 0.5))


@pytest.mark.parametrize("rescale_by", ["keep_probability", "l1"])
def test_della_is_seeded_and_preserves_the_mean(rescale_by: str):
    base = {"w": torch.zeros(40, 500)}
    model = {"w": torch.ones(40, 500)}
    kw: dict[str, Any] = {"density": 0.4, "epsilon": 0.2, "rescale_by": rescale_by}
    one = mergeops.merge("della_linear", [model], base=base, seed=1, device="cpu", **kw)["w"]
    two = mergeops.merge("della_linear", [model], base=base, seed=1, device="cpu", **kw)["w"]
    other = mergeops.merge("della_linear", [model], base=base, seed=2, device="cpu", **kw)["w"]
    assert torch.equal(one, two) and not torch.equal(one, other)
    assert abs(float(one.mean()) - 1.0) < 0.03
    assert abs(float((one != 0).float().mean()) - 0.4) < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bernoulli_cpu_draws_what_torch_bernoulli_draws(dtype: torch.dtype) -> None:
    """The same keep mask as ``torch.bernoulli`` and the generator left in the same state
    (float32/bf16 through ``torch.rand``, float64 through ``torch.bernoulli`` itself)."""
    from mergeops.ops.prune import bernoulli_cpu

    probs = torch.rand(300, 257, generator=torch.Generator().manual_seed(1)).to(dtype)
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    keep = bernoulli_cpu(probs, ours)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, torch.bernoulli(probs, generator=theirs) == 1)
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


def test_della_masks_do_not_depend_on_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """DELLA's row ranks split over torch's threads (``kernels.della_probabilities``) and its
    models draw side by side (``MaskSweep``); the merge is the same bits with one thread or
    two, and the thread setting is what it was."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(96, 64)}
    models = [{"w": (torch.randn(96, 64, generator=g) * 4).round()} for _ in range(2)]  # ties
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
            merged = mergeops.merge("della", models, base=base, device="cpu", density=0.5,
                                    epsilon=0.2, seed=4)  # fmt: skip
            assert torch.get_num_threads() == threads
            outputs.append(merged["w"])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[0].view(torch.int32), outputs[1].view(torch.int32))


def test_della_density_one_reduces_to_ties_and_task_arithmetic():
    taus = [[1.0, -2.0, 0.5, 3.0], [-1.5, 1.0, 0.5, 2.0]]
    _close(
        _merge("della", taus, weight=[1.0, 2.0]),
        _merge("ties", taus, weight=[1.0, 2.0], density=1.0).tolist(),
    )
    assert torch.equal(_merge("della_linear", taus), _merge("task_arithmetic", taus))


# ---- sce -----------------------------------------------------------------------------------
def test_sce_weights_by_energy_and_erases_minority_signs():
    # energies 5/3 and 7 -> w = 5/26, 21/26; signs + everywhere; [1]: (2·5 + 4·21)/26
    out = _merge("sce", [[1.0, 2.0, 0.0], [-1.0, 4.0, 2.0]])
    _close(out, [1.0, 94 / 26, 2.0])


@pytest.mark.parametrize("models", [1, 2, 4, 5])
def test_sce_variance_has_the_bits_of_torch_var(models: int) -> None:
    """``variance_across`` (Welford's float64 updates as slice-wide ops on the CPU) gives the
    bits of ``torch.var(dim=0, unbiased=False)``: task vectors of bf16 checkpoints at several
    scales, exact zeros, equal values across models, and slices of two shapes one after
    another (its scratch buffers reused)."""
    from mergeops.ops.sce import variance_across

    g = torch.Generator().manual_seed(models)
    for rows, cols in [(300, 257), (17, 1000)]:
        base = torch.randn(rows, cols, generator=g).bfloat16().float()
        scales = [10.0 ** -(t % 4) for t in range(models)]
        tvs = torch.stack(
            [(base + torch.randn(rows, cols, generator=g) * s).bfloat16().float() - base
             for s in scales]
        )  # fmt: skip
        tvs[:, :5] = 0.0
        tvs[:, 5:9] = tvs[0, 5:9].clone()  # equal across models
        expected = torch.var(tvs, dim=0, unbiased=False)
        assert torch.equal(variance_across(tvs).view(torch.int32), expected.view(torch.int32))


def test_sce_select_keeps_the_highest_variance_positions():
    taus = torch.tensor([[1.0, 2.0, 0.0, 5.0], [1.0, 4.0, 2.0, -5.0]])
    # variances 0, 1, 1, 25: 3 nonzero, k = int(3 * 0.34) = 1
    assert select_mask(taus, 0.34).tolist() == [0.0, 0.0, 0.0, 1.0]
    out = _merge("sce", taus.tolist(), select_topk=0.34)
    _close(out, [0.0, 0.0, 0.0, 5.0])  # signs tie at [3] (sum 0 -> +): model 1's +5 wins


# ---- ram -----------------------------------------------------------------------------------
RAM_TAUS = [[1.0, 0.0, 2.0, 0.0, 2.0], [0.0, 0.0, 4.0, 3.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]


def test_ram_keeps_unique_moves_and_averages_shared_ones():
    _close(_merge("ram", RAM_TAUS), [1.0, 0.0, 3.0, 3.0, 2.0])


def test_ramplus_boosts_unique_moves_by_the_shared_ratio():
    # λ_1 = 1 + 0.5·min(2/1, 2) = 2, λ_2 = 1 + 0.5·1 = 1.5 (model 3 has no unique entries)
    _close(_merge("ramplus_tl", RAM_TAUS, r=0.5, alpha=2.0), [1.0, 0.0, 3.0, 4.5, 4.0])


def test_ram_epsilon_ignores_tiny_moves():
    _close(_merge("ram", [[1e-6, 2.0], [1.0, 2.0]]), [1.0, 2.0])
    _close(_merge("ram", [[1e-6, 2.0], [1.0, 2.0]], epsilon=0.0), [0.5 + 5e-7, 2.0])


# ---- chunked == whole ----------------------------------------------------------------------
CHUNK_CASES: list[tuple[str, dict[str, Any]]] = [
    ("ties", {"density": 0.3, "tie_break": "mergekit", "rescale": True}),
    ("ties", {"density": [0.2, 0.5], "trim_scope": "model", "rescale": True}),
    ("dare_ties", {"density": 0.4, "rescale_by": "l1"}),
    ("dare_linear", {"density": 0.4, "rescale": False}),
]


@pytest.mark.parametrize(("method", "params"), CHUNK_CASES)
def test_chunked_merge_is_bit_identical(
    monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, Any]
):
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(64, 128, generator=gen)}
    models = [
        {"w": base["w"] + torch.randint(-3, 4, (64, 128), generator=gen) * 0.125} for _ in range(2)
    ]
    outs = []
    for chunk in (1 << 40, 4096):
        monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
        outs.append(mergeops.merge(method, models, base=base, device="cpu", seed=5, **params)["w"])
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


# ---- bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("della", {"density": 0.1, "epsilon": 0.15}, ["della", "model 'ft-1'", "epsilon"]),
        ("breadcrumbs", {"gamma": 2.0}, ["model", "gamma", "2.0"]),
        ("ties", {"tie_break": "random"}, ["tie_break", "random"]),
        ("dare_linear", {"rescale_by": "l2"}, ["rescale_by", "l2"]),
        ("sce", {"weight": 1.0}, ["unknown parameter 'weight'", "select_topk"]),
        ("ramplus_tl", {"alpha": -1.0}, ["alpha", "-1.0"]),
    ],
)
def test_bad_params_name_model_and_parameter(method: str, params: dict[str, Any], words: list[str]):
    base = {"w": torch.zeros(3)}
    models = {"ft-1": {"w": torch.ones(3)}, "ft-2": {"w": torch.ones(3)}}
    with pytest.raises(MergeError) as info:
        mergeops.merge(method, models, base=base, device="cpu", **params)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("method", ["breadcrumbs", "della", "sce", "ram", "ramplus_tl"])
def test_missing_base_and_shape_mismatch_are_named(method: str):
    models = {"ft-1": {"w": torch.ones(3)}, "ft-2": {"w": torch.ones(4)}}
    with pytest.raises(MergeError, match="base"):
        mergeops.merge(method, [models["ft-1"]], device="cpu")
    with pytest.raises(MergeError, match=r"'w'.*ft-2"):
        mergeops.merge(method, models, base={"w": torch.zeros(3)}, device="cpu")


# ---- dare: masks drawn a slice at a time --------------------------------------------------
def test_dare_rows_draws_the_whole_mask_slice_by_slice() -> None:
    """``DareRows`` gives, slice after slice, the mask one ``dare_keep`` call draws (float 1/0
    for float32 slices, bool otherwise); slices out of order are refused, offset 0 restarts."""
    from mergeops.ops.sparsify import DareRows, dare_keep

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    whole = dare_keep((40, 33), 0.3, generator(), torch.device("cpu"))
    assert whole is not None
    rows = DareRows(generator, 0.3)
    for _ in range(2):  # a second pass from offset 0 draws the same again
        spans = [(0, 7), (7, 30), (37, 3)]  # each mask is scratch: copied before the next
        parts = [rows.keep_rows(torch.empty(n, 33), 33 * s).clone() for s, n in spans]
        assert torch.equal(torch.cat(parts).bool(), whole)
    assert rows.keep_rows(torch.empty(5, 33, dtype=torch.bfloat16), 0).dtype == torch.bool
    with pytest.raises(ValueError, match="expected offset 165, got 330"):
        rows.keep_rows(torch.empty(5, 33), 330)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_chunked_dare_draws_no_whole_mask(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked on the CPU with 1/density rescale, DARE draws each slice's mask as the merge
    reaches it (no whole-tensor ``dare_keep``) and equals the unchunked merge bit for bit."""
    from mergeops.methods.task_vector import dare

    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(64, 128, generator=g)}
    models = [{"w": base["w"] + torch.randn(64, 128, generator=g)} for _ in range(3)]
    params = {"density": [0.5, 0.2, 1.0], "seed": 3}
    whole = mergeops.merge(method, models, base=base, device="cpu", **params)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a chunked CPU merge must not draw whole masks")

    monkeypatch.setattr(dare, "dare_keep", refuse)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    chunked = mergeops.merge(method, models, base=base, device="cpu", **params)
    assert torch.equal(whole["w"].view(torch.int32), chunked["w"].view(torch.int32))


def test_dare_keep_drawn_in_blocks_is_one_whole_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the whole mask is drawn a block of uniforms at a time into scratch: the same
    mask as one ``torch.rand`` of the whole shape, and the generator left where it would be."""
    from mergeops.ops import sparsify

    monkeypatch.setattr(sparsify, "DRAW_BLOCK", 1000)  # 1320 entries: a block and a ragged one
    ours, theirs = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    keep = sparsify.dare_keep((40, 33), 0.3, ours, torch.device("cpu"))
    assert keep is not None and keep.dtype == torch.bool
    assert torch.equal(keep, torch.rand(40, 33, generator=theirs) < 0.3)
    assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=theirs))


def test_chunked_dare_with_l1_rescale_equals_the_whole_merge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mergekit's ``rescale`` (L1): whole masks held packed and the factor from the magnitude
    taken in place; the chunked merge equals the unchunked one bit for bit, and a model's
    merged τ keeps its L1 norm."""
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(64, 128, generator=g)}
    model = {"w": base["w"] + torch.randn(64, 128, generator=g)}
    params = {"density": 0.4, "seed": 5, "rescale_by": "l1"}
    whole = mergeops.merge("dare_linear", [model], base=base, device="cpu", **params)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)
    chunked = mergeops.merge("dare_linear", [model], base=base, device="cpu", **params)
    assert torch.equal(whole["w"].view(torch.int32), chunked["w"].view(torch.int32))
    tau, merged = model["w"] - base["w"], chunked["w"] - base["w"]
    assert (merged == 0).float().mean() > 0.5
    assert torch.allclose(merged.abs().sum(), tau.abs().sum(), rtol=1e-4)
