"""linear and task_arithmetic on hand-computed tiny tensors."""

import pytest
import torch

import mergeops

A = {"w": torch.tensor([2.0, 2.0, 5.0]), "b": torch.tensor([1.0])}
C = {"w": torch.tensor([0.0, 4.0, 3.0]), "b": torch.tensor([3.0])}
BASE = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.0])}


def test_linear_equal_weights_is_the_mean():
    out = mergeops.merge("linear", [A, C], device="cpu")
    assert torch.equal(out["w"], torch.tensor([1.0, 3.0, 4.0]))
    assert torch.equal(out["b"], torch.tensor([2.0]))


def test_linear_weights_normalized_and_not():
    out = mergeops.merge("linear", [A, C], weight=[1.0, 3.0], device="cpu")
    assert torch.allclose(out["w"], torch.tensor([0.5, 3.5, 3.5]))
    raw = mergeops.merge("linear", [A, C], weight=[1.0, 3.0], normalize=False, device="cpu")
    assert torch.allclose(raw["w"], torch.tensor([2.0, 14.0, 14.0]))


def test_linear_accepts_a_name_mapping_and_per_model_params():
    out = mergeops.merge(
        "linear", {"a": A, "c": C}, model_params=[{"weight": 3.0}, {"weight": 1.0}], device="cpu"
    )
    assert torch.allclose(out["w"], torch.tensor([1.5, 2.5, 4.5]))


def test_task_arithmetic_hand_computed():
    # τ_a = [1, 0, 2], τ_c = [-1, 2, 0]; θ0 + 0.5·(1·τ_a + 2·τ_c) = [0.5, 4, 4]
    out = mergeops.merge(
        "task_arithmetic", [A, C], base=BASE, weight=[1.0, 2.0], device="cpu", **{"lambda": 0.5}
    )
    assert torch.allclose(out["w"], torch.tensor([0.5, 4.0, 4.0]))
    assert torch.allclose(out["b"], torch.tensor([3.5]))


def test_task_arithmetic_defaults_are_plain_sum():
    out = mergeops.merge("task_arithmetic", [A, C], base=BASE, device="cpu")
    assert torch.allclose(out["w"], torch.tensor([1.0, 4.0, 5.0]))


def test_output_keeps_base_dtype_unless_asked():
    base16 = {k: v.to(torch.bfloat16) for k, v in BASE.items()}
    a16 = {k: v.to(torch.bfloat16) for k, v in A.items()}
    out = mergeops.merge("task_arithmetic", [a16], base=base16, device="cpu")
    assert out["w"].dtype == torch.bfloat16
    out32 = mergeops.merge("task_arithmetic", [a16], base=base16, device="cpu", dtype="float32")
    assert out32["w"].dtype == torch.float32


def test_integer_buffers_pass_through_from_base():
    ids = torch.arange(4)
    out = mergeops.merge(
        "task_arithmetic",
        [{**A, "ids": ids.clone()}],
        base={**BASE, "ids": ids},
        device="cpu",
    )
    assert torch.equal(out["ids"], ids)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_registry_entry_has_paper_and_params(method):
    entry = mergeops.get_method(method)
    assert entry.paper.startswith("https://arxiv.org/")
    assert "weight" in entry.model_params_model.model_fields
