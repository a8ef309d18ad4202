"""Data-free frontier merges (magmax, emr, pcb, iso_c, iso_cts, tsv_m, wudi): hand-computed
tiny cases and reference math written here from the papers, in float64 numpy."""

import numpy as np
import pytest
import torch

import mergeops
from mergeops.io import ShardedCheckpoint
from mergeops.methods.masks.emr import reconstruct_model
from mergeops.ops.subspace import interference_loss

ZERO = {"w": torch.zeros(3)}


def _models(*taus):
    return [{"w": torch.tensor(t, dtype=torch.float32)} for t in taus]


def _random_family(rows=6, cols=4, count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(rows, cols, generator=gen), "b": torch.randn(cols, generator=gen)}
    fts = [
        {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(count)
    ]
    taus = [(ft["w"] - base["w"]).double().numpy() for ft in fts]
    return base, fts, taus


def test_magmax_picks_the_largest_magnitude_per_entry():
    out = mergeops.merge("magmax", _models([1, -3, 0.5], [-2, 1, 0.25]), base=ZERO, device="cpu")
    assert torch.equal(out["w"], torch.tensor([-2.0, -3.0, 0.5]))
    half = mergeops.merge(
        "magmax", _models([1, -3, 0.5], [-2, 1, 0.25]), base=ZERO, device="cpu", **{"lambda": 0.5}
    )
    assert torch.equal(half["w"], torch.tensor([-1.0, -1.5, 0.25]))


def test_emr_unified_vector_masks_and_rescalers(tmp_path):
    # τ1 = [1, -3, 2], τ2 = [-2, 1, 1]: s = sign([-1, -2, 3]) = [-, -, +];
    # τ_uni = [-2, -3, 2]; m1 = [0, 1, 1], g1 = 6/5; m2 = [1, 0, 1], g2 = 4/4.
    base = {"w": torch.tensor([10.0, 20.0, 30.0])}
    models = [{"w": base["w"] + torch.tensor(t)} for t in ([1.0, -3.0, 2.0], [-2.0, 1.0, 1.0])]
    result = mergeops.merge_files(
        "emr", models, base=base, out_dir=tmp_path / "out", model_names=["a", "b"],
        device="cpu", progress=False,
    )  # fmt: skip
    merged = ShardedCheckpoint(result.out_dir)
    assert torch.equal(merged.get("w"), torch.tensor([8.0, 17.0, 32.0]))
    streams = {name: ShardedCheckpoint(path) for name, path in result.extra_outputs.items()}
    tv = {"w": streams["task_vector"].get("w")}
    assert torch.equal(tv["w"], torch.tensor([-2.0, -3.0, 2.0]))
    expected = {"a": [10.0, 20.0 - 3.6, 30.0 + 2.4], "b": [8.0, 20.0, 32.0]}
    for name, want in expected.items():
        masks = {k: streams[f"mask.{name}"].get(k) for k in streams[f"mask.{name}"].keys()}  # noqa: SIM118 - a source, not a dict
        rescale = {"w": streams[f"rescale.{name}"].get("w")}
        rebuilt = reconstruct_model(base, tv, masks, rescale)
        assert torch.allclose(rebuilt["w"], torch.tensor(want)), name


def _pcb_reference(taus: np.ndarray, ratio: float) -> np.ndarray:
    """PCB (arXiv 2410.02396), written from the paper: intra exp(T·norm(|τ|)²), inter
    tanh(τ_i·Σ_j τ_j), keep the top `ratio` of their product, min-max, weighted mean."""
    count = taus.shape[0]

    def norm(x):
        return (x - x.min()) / (x.max() - x.min())

    betas = []
    for tau in taus:
        beta = np.exp(count * norm(np.abs(tau)) ** 2) * np.tanh(tau * taus.sum(axis=0))
        dropped = tau.size - max(1, round(ratio * tau.size))
        if dropped > 0:
            beta = np.maximum(beta, np.sort(beta)[dropped - 1])
        betas.append(norm(beta))
    betas = np.stack(betas)
    return (betas * taus).sum(axis=0) / np.maximum(betas.sum(axis=0), 1e-12)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 1.0])
def test_pcb_matches_the_papers_formulas(ratio):
    taus = np.array(
        [[0.5, -1.0, 0.2, 0.0, 0.7, -0.1, 0.3, 0.05], [0.4, 0.9, -0.2, 0.1, 0.6, -0.3, -0.3, 0.0]]
    )
    out = mergeops.merge(
        "pcb", _models(*taus.tolist()), base={"w": torch.zeros(8)}, device="cpu", pcb_ratio=ratio
    )
    assert np.allclose(out["w"].double().numpy(), _pcb_reference(taus, ratio), atol=1e-6)


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors():
    base = {"w": torch.zeros(2, 2)}
    models = [
        {"w": torch.diag(torch.tensor([3.0, 0.0]))},
        {"w": torch.diag(torch.tensor([0.0, 1.0]))},
    ]
    out = mergeops.merge("iso_c", models, base=base, device="cpu", alpha=1.5)
    assert torch.allclose(out["w"], torch.diag(torch.tensor([3.0, 3.0])), atol=1e-6)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_isotropic_merges_have_one_singular_value_and_average_other_tensors(method):
    base, fts, _ = _random_family()
    out = mergeops.merge(method, fts, base=base, device="cpu")
    s = torch.linalg.svdvals((out["w"] - base["w"]).double())
    kept = s[s > 1e-4 * s[0]]  # iso_cts may keep fewer directions than the full rank
    assert kept.numel() >= 3
    assert torch.allclose(kept, kept[0].expand_as(kept), rtol=1e-4)
    mean_tau = torch.stack([ft["b"] - base["b"] for ft in fts]).mean(dim=0)
    assert torch.allclose(out["b"], base["b"] + mean_tau, atol=1e-6)


def test_iso_cts_with_a_full_common_space_is_iso_c():
    base, fts, _ = _random_family()
    a = mergeops.merge("iso_cts", fts, base=base, device="cpu", common_space_fraction=1.0)
    b = mergeops.merge("iso_c", fts, base=base, device="cpu")
    assert torch.allclose(a["w"], b["w"], atol=1e-5)


def _polar(m: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(m, full_matrices=False)
    return p @ qt


def test_tsv_m_matches_reference_math():
    base, fts, taus = _random_family(rows=6, cols=4, count=2)
    k = 4 // 2
    parts = [np.linalg.svd(t, full_matrices=False) for t in taus]
    u = _polar(np.concatenate([p[0][:, :k] for p in parts], axis=1))
    s = np.concatenate([p[1][:k] for p in parts])
    v = _polar(np.concatenate([p[2][:k] for p in parts], axis=0).T)
    expected = base["w"].double().numpy() + (u * s) @ v.T
    out = mergeops.merge("tsv_m", fts, base=base, device="cpu")
    assert np.allclose(out["w"].double().numpy(), expected, atol=1e-5)


def test_tsv_m_of_orthogonal_task_vectors_is_their_sum():
    models = [
        {"w": torch.diag(torch.tensor([3.0, 0.0]))},
        {"w": torch.diag(torch.tensor([0.0, 1.0]))},
    ]
    out = mergeops.merge("tsv_m", models, base={"w": torch.zeros(2, 2)}, device="cpu")
    assert torch.allclose(out["w"], torch.diag(torch.tensor([3.0, 1.0])), atol=1e-6)


def test_wudi_lowers_the_interference_loss_and_keeps_a_lone_task():
    base, fts, _ = _random_family(count=3)
    taus = [ft["w"] - base["w"] for ft in fts]
    start = interference_loss(torch.stack(taus).sum(dim=0), taus)
    out = mergeops.merge("wudi", fts, base=base, device="cpu", steps=200, lr=1e-2)
    assert interference_loss(out["w"] - base["w"], taus) < 0.5 * start
    untouched = mergeops.merge("wudi", fts, base=base, device="cpu", steps=0)
    assert torch.allclose(untouched["w"], base["w"] + torch.stack(taus).sum(dim=0), atol=1e-6)
    lone = mergeops.merge("wudi", fts[:1], base=base, device="cpu", steps=50, lr=1e-2)
    assert torch.allclose(lone["w"], fts[0]["w"], atol=1e-5)


@pytest.mark.parametrize("method", ["magmax", "emr", "pcb", "iso_c", "iso_cts", "tsv_m", "wudi"])
def test_needs_a_base_and_rejects_unknown_params(method):
    _, fts, _ = _random_family()
    with pytest.raises(mergeops.MergeError, match="needs a base"):
        mergeops.merge(method, fts, device="cpu")
    with pytest.raises(mergeops.MergeError, match="unknown parameter 'densty'"):
        mergeops.merge(method, fts, base=fts[0], device="cpu", densty=0.5)


@pytest.mark.parametrize("method", ["magmax", "pcb", "iso_c", "tsv_m"])
def test_bfloat16_inputs_give_base_dtype_output(method):
    base, fts, _ = _random_family()
    cast = [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in fts]
    out = mergeops.merge(
        method, cast, base={k: v.to(torch.bfloat16) for k, v in base.items()}, device="cpu"
    )
    assert out["w"].dtype == torch.bfloat16
    assert torch.isfinite(out["w"].float()).all()


def test_doge_ta_without_steps_is_norm_equalised_masked_task_arithmetic():
    base, fts, taus = _random_family(count=2)
    norms = [np.linalg.norm(t) for t in taus]
    lams = [0.3 * np.mean(norms) / n for n in norms]
    expected = base["w"].double().numpy() + sum(lam * t for lam, t in zip(lams, taus, strict=True))
    out = mergeops.merge("doge_ta", fts, base=base, device="cpu", steps=0, density=1.0)
    assert np.allclose(out["w"].double().numpy(), expected, atol=1e-5)


def test_doge_ta_correction_lowers_its_loss_and_stays_off_the_shared_subspace():
    from mergeops.ops.subspace import doge_loss, doge_merge, shared_subspace

    _, fts, _ = _random_family(rows=8, cols=6, count=3)
    base_w = _random_family(rows=8, cols=6, count=3)[0]["w"]
    taus = [ft["w"] - base_w for ft in fts]
    kwargs = {"scale": 0.3, "density": 0.5, "subspace_rank": 0.34}
    start = doge_merge(taus, steps=0, lr=1e-2, **kwargs)
    tuned = doge_merge(taus, steps=100, lr=1e-2, **kwargs)
    assert doge_loss(tuned, taus) < doge_loss(start, taus)
    basis = shared_subspace(taus, 2)
    change = tuned - start
    assert torch.allclose(basis.T @ change, torch.zeros(2, 6), atol=1e-4)
