"""dare_linear / dare_ties: seeded drops, rescaling, statistical mean preservation."""

import pytest
import torch

import mergeops
from mergeops.ops.sparsify import dare_drop

BASE = {"w": torch.zeros(20000)}
MODEL = {"w": torch.ones(20000)}


def test_dare_drop_rescales_survivors_and_preserves_the_mean():
    gen = torch.Generator().manual_seed(0)
    dropped = dare_drop(torch.ones(50000), 0.25, gen)
    survivors = dropped[dropped != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 4.0))
    assert abs(float(dropped.mean()) - 1.0) < 0.05
    assert abs(survivors.numel() / 50000 - 0.25) < 0.01


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_seeded_and_mean_preserving(method):
    one = mergeops.merge(method, [MODEL], base=BASE, density=0.5, seed=7, device="cpu")
    two = mergeops.merge(method, [MODEL], base=BASE, density=0.5, seed=7, device="cpu")
    other = mergeops.merge(method, [MODEL], base=BASE, density=0.5, seed=8, device="cpu")
    assert torch.equal(one["w"], two["w"])
    assert not torch.equal(one["w"], other["w"])
    assert abs(float(one["w"].mean()) - 1.0) < 0.05


def test_dare_density_one_is_task_arithmetic():
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, generator=gen)}
    models = [{"w": base["w"] + torch.randn(6, generator=gen)} for _ in range(2)]
    dare = mergeops.merge("dare_linear", models, base=base, density=1.0, device="cpu")
    ta = mergeops.merge("task_arithmetic", models, base=base, device="cpu")
    assert torch.allclose(dare["w"], ta["w"])


def test_dare_draws_differ_per_model_and_tensor():
    base = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    model = {"a": torch.ones(1000), "b": torch.ones(1000)}
    out = mergeops.merge("dare_linear", [model], base=base, density=0.5, device="cpu")
    assert not torch.equal(out["a"], out["b"])


@pytest.mark.parametrize("rescale_by", ["keep_probability", "l1"])
def test_dare_rescale_modes_match_mergekit_on_average(rescale_by):
    """1/density and L1 rescales agree in expectation with mergekit's L1 ``rescale``."""
    import mergekit.sparsify as sparsify

    gen = torch.Generator().manual_seed(5)
    tau = torch.randn(50000, generator=gen)
    ours = mergeops.merge(
        "dare_linear", [{"w": tau}], base={"w": torch.zeros(50000)}, density=0.3,
        rescale_by=rescale_by, device="cpu",
    )["w"]  # fmt: skip
    torch.manual_seed(0)
    theirs = sparsify.bernoulli(tau, 0.3, sparsify.RescaleNorm.l1)
    for stat in (lambda t: t.abs().sum(), lambda t: (t != 0).float().mean()):
        assert abs(float(stat(ours)) / float(stat(theirs)) - 1) < 0.03
