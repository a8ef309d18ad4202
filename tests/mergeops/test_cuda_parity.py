"""Every method on CUDA gives the CPU result: bit-equal for elementwise methods, within 1e-5
relative otherwise (skipped cleanly without CUDA; run by ``bench/gpu_check.sh``).

DARE draws its random drops from a CUDA generator on the GPU, so dare_* are compared at
density 1 (no drops) for equality, and at density 0.6 only for the kept fraction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mergeops import pipeline
from tests.mergeops.test_prefetch import CASE_NAMES, family, method_cases, run_case

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ELEMENTWISE = {"linear", "task_arithmetic", "ties", "ties_model"}
"""Merged through the device pipeline with the same per-element arithmetic as on CPU."""


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return method_cases(tmp_path_factory.mktemp("cuda"), family())


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("slice_bytes", [4096, 32 * 1024 * 1024])
def test_cuda_matches_cpu(
    name: str,
    slice_bytes: int,
    cases: dict[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pipeline, "SLICE_BYTES", slice_bytes)  # many slices, or one per tensor
    case = dict(cases[name])
    if name.startswith("dare"):
        case["density"] = 1.0
    cpu = run_case(name, case, tmp_path / "cpu", device="cpu")
    gpu = run_case(name, case, tmp_path / "gpu", device="cuda")
    pairs = [(cpu.merged, gpu.merged)] + [(cpu.extras[s], gpu.extras[s]) for s in cpu.extras]
    assert cpu.extras.keys() == gpu.extras.keys()
    for expected, got in pairs:
        assert expected.keys() == got.keys()
        for key, tensor in expected.items():
            other = got[key]
            assert other.device.type == "cpu" and other.dtype == tensor.dtype, key
            if name in ELEMENTWISE or name.startswith("dare") or not tensor.is_floating_point():
                assert torch.equal(tensor.view(torch.uint8), other.view(torch.uint8)), (
                    f"{name} {key}: max rel {_max_rel(other, tensor):.2e}"
                )
            else:
                assert _max_rel(other, tensor) <= 1e-5, (name, key)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_cuda_dare_drops_the_asked_fraction(method: str) -> None:
    import mergeops

    tensors = family()
    merged = mergeops.merge(method, tensors[1:2], base=tensors[0], device="cuda", density=0.6)
    changed = (merged["embed"] != tensors[0]["embed"]).float().mean()
    assert 0.5 < float(changed) < 0.7


def test_cuda_pipeline_is_used_and_output_is_checked_on_the_device() -> None:
    import mergeops
    from mergeops import engine
    from mergeops.cuda_stream import CudaBackend
    from mergeops.methods.base import MergeError
    from mergeops.plan import PlanRequest, build_plan

    tensors = family()
    for method, pipelined in (("ties", True), ("linear", True), ("consensus", False)):
        plan = build_plan(PlanRequest(method, tensors[1:], base=tensors[0], device="cuda"))
        assert isinstance(engine.pipeline_backend(plan), CudaBackend) == pipelined, method
    with pytest.raises(MergeError, match="merged tensor 'embed'"):
        mergeops.merge("task_arithmetic", tensors[1:], base=tensors[0], device="cuda",
                       weight=[1.0, float("inf"), 1.0])  # fmt: skip


def _averaging_cases() -> dict[str, tuple[list[Any], dict[str, Any]]]:
    """mergekit's averaging-family methods: (models, keyword arguments) on the bf16 family."""
    base, *fts = family()
    return {
        "slerp": (fts[:1], {"base": base, "t": 0.3}),
        "nuslerp": (fts[:2], {"weight": [1.0, 2.0]}),
        "nuslerp_rows": (fts[:2], {"base": base, "weight": 1.0, "nuslerp_flatten": False}),
        "multislerp": (fts, {"base": base, "weight": [1.0, 0.5, 2.0]}),
        "karcher": (fts, {}),
        "model_stock": (fts, {"base": base, "filter_wise": True}),
        "nearswap": (fts[:1], {"base": base, "t": 0.05}),
        "passthrough": (fts[:1], {"scale": 0.5}),
        "arcee_fusion": (fts[:1], {"base": base}),
    }


@pytest.mark.parametrize("name", list(_averaging_cases()))
def test_cuda_matches_cpu_for_mergekit_averaging_methods(name: str) -> None:
    """Elementwise ones (nearswap, passthrough) bit-equal; reductions within 1e-5 relative
    (float32 outputs, so a last-bit difference does not become a bf16 rounding flip)."""
    import mergeops

    models, kwargs = _averaging_cases()[name]
    method = name.removesuffix("_rows")
    cpu = mergeops.merge(method, models, device="cpu", dtype="float32", **kwargs)
    gpu = mergeops.merge(method, models, device="cuda", dtype="float32", **kwargs)
    assert cpu.keys() == gpu.keys()
    for key, tensor in cpu.items():
        other = gpu[key]
        assert other.device.type == "cpu" and other.dtype == tensor.dtype, key
        if name in ("nearswap", "passthrough") or not tensor.is_floating_point():
            assert torch.equal(tensor.view(torch.uint8), other.view(torch.uint8)), (name, key)
        else:
            assert _max_rel(other, tensor) <= 1e-5, (name, key, _max_rel(other, tensor))
