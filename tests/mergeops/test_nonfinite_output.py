"""No merge publishes NaN/Inf: non-finite inputs, a weight of inf and an overflowing cast all
fail naming the tensor (and the input or parameter), and leave no output folder behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import mergeops
from mergeops import chunking
from mergeops.methods.base import MergeError
from tests.mergeops.test_prefetch import family, write_family


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def _merge_files(out: Path, method: str, paths: list[Path], **kwargs: Any) -> None:
    base, models = paths[0], paths[1:]
    extra = {"base": base} if method != "linear" else {}
    mergeops.merge_files(method, models, out_dir=out, device="cpu", progress=False,
                         **extra, **kwargs)  # fmt: skip


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "lambda"])
@pytest.mark.parametrize("chunk", [1 << 40, 4096])
def test_a_weight_of_inf_names_tensor_and_model_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, chunk: int
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
    paths = write_family(tmp_path / "in", family())
    out = tmp_path / "out"
    kwargs: dict[str, Any] = {"model_params": [{"weight": 1.0}, {"weight": float("inf")}, {}]}
    if method == "lambda":  # a global parameter instead
        method, kwargs = "task_arithmetic", {"params": {"lambda": float("inf")}}
    with pytest.raises(MergeError) as info:
        _merge_files(out, method, paths, **kwargs)
    message = str(info.value)
    assert "merged tensor 'embed'" in message and "NaN or Inf" in message
    global_param = "params" in kwargs
    expected = "parameter 'lambda' is inf" if global_param else "model 'ft-2' has weight inf"
    assert expected in message, message
    _assert_nothing_left(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(("key", "chunk"), [("embed", 4096), ("embed", 1 << 40), ("norm", 4096)])
def test_non_finite_inputs_are_refused_naming_tensor_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float, key: str, chunk: int
) -> None:
    monkeypatch.setattr(chunking, "CHUNK_BYTES", chunk)
    tensors = family()
    tensors[3][key].view(-1)[-1] = bad  # last element: the last slice of a chunked tensor
    paths = write_family(tmp_path / "in", tensors)
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=f"tensor '{key}' of model 'ft-3' contains NaN or Inf"):
        _merge_files(out, "task_arithmetic", paths)
    _assert_nothing_left(out)


def test_an_overflowing_cast_is_caught_in_the_output_dtype(tmp_path: Path) -> None:
    tensors = [{k: v.float() * 3e4 for k, v in m.items() if k != "ids"} for m in family()]
    paths = write_family(tmp_path / "in", tensors)
    out = tmp_path / "out"
    with pytest.raises(MergeError) as info:  # finite in float32, beyond float16's 65504
        _merge_files(out, "linear", paths, params={"normalize": False}, dtype="float16")
    assert "merged tensor 'embed'" in str(info.value)
    assert "all inputs were finite" in str(info.value)
    _assert_nothing_left(out)
    mergeops.merge_files("linear", paths[1:], out_dir=out, device="cpu", progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # finite: published as usual
