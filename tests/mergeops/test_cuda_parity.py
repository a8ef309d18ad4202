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
