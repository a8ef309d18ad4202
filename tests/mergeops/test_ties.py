"""ties: hand-computed cases, the density-1 reduction, and the model-wide trim scope."""

import pytest
import torch

import mergeops
from mergeops.ops.selection import topk_mask_by
from mergeops.ops.sparsify import RadixTopK, topk_mask
from tests.mergeops.families import tied_family

BASE = {"w": torch.tensor([1.0, 2.0, 3.0])}
A = {"w": torch.tensor([2.0, 2.0, 5.0])}  # τ = [1, 0, 2]
C = {"w": torch.tensor([0.0, 4.0, 3.0])}  # τ = [-1, 2, 0]


def test_ties_full_density_hand_computed():
    # elected sign + everywhere (sum [0, 2, 2], zero -> +); kept: a[0], c[1], a[2]
    out = mergeops.merge("ties", [A, C], base=BASE, density=1.0, device="cpu")
    assert torch.allclose(out["w"], torch.tensor([2.0, 4.0, 5.0]))


def test_ties_trim_and_normalize_by_kept_weights():
    # k = max(1, ⌊0.4·3⌋) = 1: a keeps 2 at [2], c keeps 2 at [1]
    out = mergeops.merge("ties", [A, C], base=BASE, density=0.4, weight=[2.0, 1.0], device="cpu")
    assert torch.allclose(out["w"], torch.tensor([1.0, 4.0, 5.0]))
    raw = mergeops.merge(
        "ties", [A, C], base=BASE, density=0.4, weight=[2.0, 1.0], normalize=False, device="cpu"
    )
    assert torch.allclose(raw["w"], torch.tensor([1.0, 4.0, 7.0]))


def test_ties_sign_election_drops_the_minority():
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([3.0, 1.0])}, {"w": torch.tensor([-1.0, 1.0])}]
    out = mergeops.merge("ties", models, base=base, density=1.0, normalize=False, device="cpu")
    assert torch.allclose(out["w"], torch.tensor([3.0, 2.0]))


def test_ties_density_one_without_normalize_is_task_arithmetic():
    gen = torch.Generator().manual_seed(0)
    base = {"x": torch.randn(5, 7, generator=gen), "y": torch.randn(11, generator=gen)}
    models = [
        {k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)
    ]
    # The reduction holds where signs agree (ties drops minority signs at any density).
    same_sign = [{k: base[k] + (v - base[k]).abs() for k, v in m.items()} for m in models]
    ties = mergeops.merge("ties", same_sign, base=base, density=1.0, normalize=False, device="cpu")
    ta = mergeops.merge("task_arithmetic", same_sign, base=base, device="cpu")
    for key in base:
        assert torch.allclose(ties[key], ta[key], atol=1e-6)


def test_topk_mask_keeps_exactly_k_with_ties_by_position():
    values = torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])
    mask = topk_mask(values, 0.4)  # k = 2 among three equal magnitudes
    assert mask.tolist() == [True, True, False, False, False]


def _model_scope_reference(taus, density):
    flat = torch.cat([t.abs().reshape(-1) for t in taus])
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(-flat, stable=True)[:k]] = True
    return keep


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_radix_topk_matches_a_full_sort(density):
    gen = torch.Generator().manual_seed(1)
    # bf16-rounded values give many exact ties at the threshold
    taus = [torch.randn(n, generator=gen).to(torch.bfloat16).float() for n in (50, 300, 7)]
    selector = RadixTopK(density)
    for sweep in range(2):
        for i, tau in enumerate(taus):
            selector.observe(f"t{i}", tau.abs())
        more = selector.next_pass()
        assert more == (sweep == 0)
    cut = selector.result()
    got = torch.cat([cut.mask(f"t{i}", tau.abs()) for i, tau in enumerate(taus)])
    expected = _model_scope_reference(taus, density)
    assert int(got.sum()) == int(expected.sum())
    assert torch.equal(got, expected)


def test_ties_model_scope_uses_one_threshold_over_all_tensors():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    model = {"a": torch.tensor([9.0, 8.0, 7.0, 6.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    per_tensor = mergeops.merge("ties", [model], base=base, density=0.5, device="cpu")
    per_model = mergeops.merge(
        "ties", [model], base=base, density=0.5, trim_scope="model", device="cpu"
    )
    assert per_tensor["b"].tolist() == [0.0, 0.0, 3.0, 4.0]
    assert per_model["a"].tolist() == [9.0, 8.0, 7.0, 6.0]
    assert per_model["b"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_ties_bad_trim_scope_names_the_param():
    with pytest.raises(mergeops.MergeError, match="trim_scope"):
        mergeops.merge("ties", [A], base=BASE, trim_scope="layer", device="cpu")


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5])
def test_mergekit_tie_break_keeps_what_mergekit_keeps(density):
    import mergekit.sparsify as sparsify

    gen = torch.Generator().manual_seed(2)
    # bf16 values in a narrow range: hundreds of equal magnitudes at every threshold
    tau = (torch.randn(4000, generator=gen) * 0.05).to(torch.bfloat16)
    expected = sparsify.magnitude(tau, density) != 0
    got = topk_mask_by(tau, density, "mergekit") & (tau != 0)
    assert torch.equal(got, expected)
    by_position = topk_mask_by(tau, density, "position")
    assert int(by_position.sum()) == int(topk_mask_by(tau, density, "mergekit").sum())


def test_ties_tie_break_param_reaches_the_trim():
    base = {"w": torch.zeros(5)}
    model = {"w": torch.tensor([1.0, -1.0, 1.0, 0.5, 1.0])}
    out = mergeops.merge("ties", [model], base=base, density=0.4, device="cpu")
    assert out["w"].tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    kept = mergeops.merge("ties", [model], base=base, density=0.4, tie_break="mergekit")
    assert int((kept["w"] != 0).sum()) == 2


def test_position_ties_chunked_by_sweeps_without_whole_task_vectors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunked ties under the position rule gets its cuts from sweeps over the slices (never
    the whole τ_t) and equals the whole-tensor merge bit for bit, ties at the cut included."""
    from mergeops import chunking
    from mergeops.methods.task_vector.ties import Ties

    base, models = tied_family(5)
    params = {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.3, 1.0]}
    whole = mergeops.merge("ties", models, base=base, device="cpu", **params)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the position rule must not read whole task vectors")

    monkeypatch.setattr(Ties, "tensor_stats", refuse)
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 4096)  # 8 slices of 8 rows
    chunked = mergeops.merge("ties", models, base=base, device="cpu", **params)
    assert torch.equal(whole["w"].view(torch.int32), chunked["w"].view(torch.int32))


def test_ordered_tie_cut_keeps_first_ties_and_needs_slices_in_order() -> None:
    from mergeops.ops.streamed_topk import OrderedTieCut, SliceTopK

    magnitude = torch.tensor([1.0, 2.0, 2.0, 3.0, 2.0, 0.5, 2.0, 2.0])
    selector = SliceTopK(magnitude.numel(), 0.5)  # k = 4: the 3 and the first three 2s
    for piece in magnitude.split(3):
        selector.observe(piece)
    assert not selector.next_pass()
    cut = selector.cut()
    assert isinstance(cut, OrderedTieCut) and (cut.threshold, cut.quota) == (2.0, 3)
    pieces = zip(magnitude.split(3), [0, 3, 6], strict=True)
    masks = [cut.mask_rows(piece, offset) for piece, offset in pieces]
    assert torch.cat(masks).tolist() == [False, True, True, True, True, False, False, False]
    with pytest.raises(ValueError, match="expected offset 3, got 6"):
        cut.mask_rows(magnitude[:3], 0)
        cut.mask_rows(magnitude[6:], 6)


@pytest.mark.parametrize("slice_rows", [3, 40, 97])
def test_ordered_tie_cut_on_long_slices_keeps_the_first_ties_by_position(slice_rows: int) -> None:
    """Slices of 100K+ entries with ties everywhere: the quota runs out inside a slice, past
    several 16K runs and in a ragged tail; the mask is the whole-tensor position-rule mask."""
    from mergeops.ops.streamed_topk import OrderedTieCut, SliceTopK

    gen = torch.Generator().manual_seed(4)
    rows, row = 130, 4096
    magnitude = torch.randint(0, 6, (rows, row), generator=gen).float()  # huge tie groups
    expected = topk_mask(magnitude.reshape(-1), 0.45).reshape(rows, row)
    selector = SliceTopK(magnitude.numel(), 0.45)
    pieces = list(magnitude.split(slice_rows))
    while True:
        for piece in pieces:
            selector.observe(piece)
        if not selector.next_pass():
            break
    cut = selector.cut()
    assert isinstance(cut, OrderedTieCut) and cut.quota > 0
    masks = [cut.mask_rows(p, i * slice_rows * row) for i, p in enumerate(pieces)]
    assert torch.equal(torch.cat(masks), expected)


def test_per_model_stats_run_beside_each_other_whatever_torch_threads() -> None:
    """Whole-tensor statistics (mergekit-rule sorts) of small tensors run in worker threads,
    one per available core, even while the engine has lowered torch's intra-op threads."""
    import threading

    from mergeops.methods.task_vector._per_model import available_cores, per_model_stats

    names: list[str] = []

    def compute(index: int, tau: torch.Tensor) -> int:
        names.append(threading.current_thread().name)
        return index * 10

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = per_model_stats(
            [True, False, True, True], lambda i: torch.ones(8) * i, compute, -1,
            numel=8, device=torch.device("cpu"),
        )  # fmt: skip
    finally:
        torch.set_num_threads(before)
    assert results == [0, -1, 20, 30]
    if available_cores() >= 2:
        assert all(name.startswith("ckreg-stats") for name in names)
