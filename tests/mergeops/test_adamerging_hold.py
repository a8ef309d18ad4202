"""adamerging's gradient through the merged tensors equals autograd through λ, and holding the
base and task vectors in bfloat16 (``hold_dtype``) learns about the same λ with a float32 output."""

import pytest
import torch

import mergeops
from mergeops.ops.adamerging import loss_and_grad

GEN = torch.Generator().manual_seed(0)
BASE = {"w": torch.randn(4, 3, generator=GEN), "b": torch.randn(4, generator=GEN)}
FTS = [
    {k: v + 0.3 * torch.randn(v.shape, generator=GEN) for k, v in BASE.items()} for _ in range(3)
]
X = torch.randn(16, 3, generator=GEN)


class Entropy:
    def loss(self, params):
        p = torch.softmax(X @ params["w"].T + params["b"], -1)
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


@pytest.mark.parametrize("shape", [(3,), (3, 2)])
def test_gradient_equals_autograd_through_lambda(shape):
    keys = ["w", "b"]
    tvs = [{k: ft[k] - BASE[k] for k in keys} for ft in FTS]
    lambdas = torch.rand(shape, generator=GEN)
    loss, grad = loss_and_grad(Entropy(), BASE, tvs, lambdas, keys)
    reference = lambdas.clone().requires_grad_()
    merged = {}
    for i, k in enumerate(keys):
        column = reference if reference.dim() == 1 else reference[:, i]
        merged[k] = BASE[k] + sum(column[t] * tv[k] for t, tv in enumerate(tvs))
    expected = Entropy().loss(merged)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, reference.grad)


def test_bfloat16_hold_learns_the_same_coefficients_with_a_float32_output():
    common = {"base": BASE, "objective": Entropy(), "device": "cpu", "granularity": "layer",
              "steps": 30, "lr": 0.02}  # fmt: skip
    full = mergeops.merge("adamerging", FTS, **common)
    held = mergeops.merge("adamerging", FTS, hold_dtype="bfloat16", **common)
    for key, value in full.items():
        assert held[key].dtype == value.dtype == torch.float32
        torch.testing.assert_close(held[key], value, atol=0.02, rtol=0)
    with pytest.raises(Exception, match="hold_dtype"):
        mergeops.merge("adamerging", FTS, hold_dtype="float16", **common)
