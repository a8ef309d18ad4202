"""Bad inputs fail before any output is written, with messages naming model, tensor, param."""

import pytest
import torch

import mergeops

BASE = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
GOOD = {"a": torch.ones(3), "b": torch.ones(2, 2)}


def _files_merge(tmp_path, models, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(mergeops.MergeError) as info:
        mergeops.merge_files(
            kwargs.pop("method", "ties"),
            models,
            out_dir=out,
            progress=False,
            device="cpu",
            **kwargs,
        )
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name != "out"] == []
    return str(info.value)


def test_missing_tensor_names_model_and_tensor(tmp_path):
    message = _files_merge(tmp_path, {"ft": {"a": torch.ones(3)}}, base=BASE)
    assert message == "tensor 'b' of base is missing from model 'ft'"


def test_extra_tensor_is_an_error(tmp_path):
    message = _files_merge(tmp_path, {"ft": {**GOOD, "c": torch.ones(1)}}, base=BASE)
    assert "model 'ft' has tensor 'c'" in message


def test_shape_mismatch(tmp_path):
    message = _files_merge(tmp_path, {"ft-2": {**GOOD, "b": torch.ones(4)}}, base=BASE)
    assert message == "shape mismatch for 'b': base (2, 2), model 'ft-2' (4,)"


def test_dtype_mismatch(tmp_path):
    message = _files_merge(
        tmp_path, {"ft": {**GOOD, "a": torch.ones(3, dtype=torch.float16)}}, base=BASE
    )
    assert "dtype mismatch for 'a'" in message and "model 'ft'" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_tensor(tmp_path, bad):
    model = {**GOOD, "a": torch.tensor([1.0, bad, 1.0])}
    message = _files_merge(tmp_path, {"ft": model}, base=BASE)
    assert message == "tensor 'a' of model 'ft' contains NaN or Inf"


@pytest.mark.parametrize("density", [0.0, 1.5, -0.1])
def test_density_outside_unit_interval_names_the_model(tmp_path, density):
    message = _files_merge(
        tmp_path,
        {"ft-1": GOOD, "ft-2": GOOD},
        base=BASE,
        model_params=[{"density": 0.5}, {"density": density}],
    )
    assert "model 'ft-2'" in message and "density" in message


def test_missing_base(tmp_path):
    assert "needs a base model" in _files_merge(tmp_path, [GOOD], method="task_arithmetic")


def test_unknown_parameter_lists_accepted_ones(tmp_path):
    message = _files_merge(tmp_path, [GOOD], base=BASE, params={"densty": 0.5})
    assert message.startswith("unknown parameter 'densty' for method 'ties'; accepted:")
    assert "density" in message


def test_unknown_method(tmp_path):
    assert "unknown merge method 'tiez'" in _files_merge(tmp_path, [GOOD], method="tiez")


def test_duplicate_model_names():
    with pytest.raises(mergeops.MergeError, match="two models are named 'x'"):
        mergeops.merge("linear", [GOOD, GOOD], model_names=["x", "x"], device="cpu")


def test_wrong_number_of_per_model_values():
    with pytest.raises(mergeops.MergeError, match="'weight' has 3 values for 2 models"):
        mergeops.merge("linear", [GOOD, GOOD], weight=[1, 2, 3], device="cpu")


def test_existing_output_is_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        mergeops.merge_files("linear", [GOOD], out_dir=out, progress=False, device="cpu")
    assert (out / "keep.txt").read_text() == "x"
