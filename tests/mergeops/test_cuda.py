"""The CUDA path: same results as CPU (skipped cleanly without CUDA)."""

import pytest
import torch

import mergeops
from mergeops.device import resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_device_follows_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_asking_for_cuda_without_it_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties"])
@pytest.mark.parametrize("trim_scope", ["tensor", "model"])
def test_cuda_matches_cpu(method, trim_scope):
    gen = torch.Generator().manual_seed(0)
    base = {
        "x": torch.randn(64, 32, generator=gen).to(torch.bfloat16),
        "y": torch.randn(100, generator=gen),
    }
    models = [
        {
            k: (v.float() + 0.05 * torch.randn(v.shape, generator=gen)).to(v.dtype)
            for k, v in base.items()
        }
        for _ in range(3)
    ]
    params = {"density": 0.4, "trim_scope": trim_scope} if method == "ties" else {}
    if method == "dare_ties":
        params = {"density": 1.0}
    kwargs = {"base": base} if method != "linear" else {}
    on_cpu = mergeops.merge(method, models, device="cpu", **kwargs, **params)
    on_gpu = mergeops.merge(method, models, device="cuda", **kwargs, **params)
    for key in base:
        assert on_gpu[key].device.type == "cpu" and on_gpu[key].dtype == base[key].dtype
        assert torch.allclose(
            on_cpu[key].float(), on_gpu[key].float(), atol=1e-2 if key == "x" else 1e-5
        )
