"""fisher: hand-computed weighting, the equal-F reduction, norms and missing inputs."""

import pytest
import torch

import mergeops

M1 = {"w": torch.tensor([1.0, 2.0])}
M2 = {"w": torch.tensor([3.0, 6.0])}


def test_fisher_hand_computed():
    f1 = {"w": torch.tensor([3.0, 1.0])}
    f2 = {"w": torch.tensor([1.0, 1.0])}
    out = mergeops.merge("fisher", [M1, M2], fisher=[f1, f2], eps=1e-12, device="cpu")
    assert torch.allclose(out["w"], torch.tensor([1.5, 4.0]))


def test_fisher_with_equal_f_is_linear():
    f = {"w": torch.tensor([0.7, 0.2])}
    out = mergeops.merge("fisher", [M1, M2], fisher=[f, f], weight=[1.0, 3.0], device="cpu")
    linear = mergeops.merge("linear", [M1, M2], weight=[1.0, 3.0], device="cpu")
    assert torch.allclose(out["w"], linear["w"])


def test_fisher_norm_scales_lambdas_by_global_norm():
    f1 = {"w": torch.tensor([3.0, 4.0])}  # ‖F1‖ = 5
    f2 = {"w": torch.tensor([0.6, 0.8])}  # ‖F2‖ = 1
    out = mergeops.merge(
        "fisher", [M1, M2], fisher=[f1, f2], fisher_norm=True, eps=1e-12, device="cpu"
    )
    # λ1 F1 = [0.6, 0.8] = λ2 F2, so the result is the plain average
    assert torch.allclose(out["w"], torch.tensor([2.0, 4.0]))


def test_fisher_missing_input_is_an_error():
    with pytest.raises(mergeops.MergeError, match="fisher"):
        mergeops.merge("fisher", [M1, M2], device="cpu")
    with pytest.raises(mergeops.MergeError, match="fisher of model 'b' has no tensor 'w'"):
        mergeops.merge(
            "fisher",
            {"a": M1, "b": M2},
            fisher=[{"w": torch.ones(2)}, {"v": torch.ones(2)}],
            device="cpu",
        )
