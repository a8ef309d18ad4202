"""mwa: metric-derived weights, the p = 0 reduction, and missing metrics."""

import math

import pytest
import torch

import mergeops
from mergeops.ops.weights import metric_weights

M1 = {"w": torch.tensor([1.0, 0.0])}
M2 = {"w": torch.tensor([3.0, 4.0])}


def test_power_weights_lower_is_better():
    # losses 1 and 2, p = 1: w ∝ [1, 1/2] -> [2/3, 1/3]
    assert metric_weights([1.0, 2.0], p=1.0, mode="lower") == pytest.approx([2 / 3, 1 / 3])


def test_power_weights_higher_is_better():
    assert metric_weights([1.0, 3.0], p=2.0, mode="higher") == pytest.approx([0.1, 0.9])


def test_softmax_weights():
    expected = [
        math.exp(-1) / (math.exp(-1) + math.exp(-2)),
        math.exp(-2) / (math.exp(-1) + math.exp(-2)),
    ]
    got = metric_weights([1.0, 2.0], p=1.0, mode="lower", transform="softmax")
    assert got == pytest.approx(expected)


def test_mwa_hand_computed():
    out = mergeops.merge("mwa", [M1, M2], metrics=[1.0, 2.0], device="cpu")
    assert torch.allclose(out["w"], torch.tensor([5 / 3, 4 / 3]))


def test_mwa_p_zero_is_the_equal_linear_average():
    mwa = mergeops.merge("mwa", [M1, M2], metrics=[0.3, 9.0], p=0.0, device="cpu")
    linear = mergeops.merge("linear", [M1, M2], device="cpu")
    assert torch.allclose(mwa["w"], linear["w"])


def test_mwa_metrics_by_model_name():
    out = mergeops.merge(
        "mwa", {"early": M1, "late": M2}, metrics={"early": 2.0, "late": 1.0}, device="cpu"
    )
    assert torch.allclose(out["w"], torch.tensor([7 / 3, 8 / 3]))


def test_missing_metric_names_the_model():
    with pytest.raises(mergeops.MergeError, match="model 'late'"):
        mergeops.merge("mwa", {"early": M1, "late": M2}, metrics={"early": 1.0}, device="cpu")
    with pytest.raises(mergeops.MergeError, match="metric"):
        mergeops.merge("mwa", [M1, M2], device="cpu")


def test_non_positive_metric_with_power_is_an_error():
    with pytest.raises(mergeops.MergeError, match="model 'b'"):
        mergeops.merge("mwa", {"a": M1, "b": M2}, metrics=[1.0, 0.0], device="cpu")
