"""mergekit's averaging-family methods on hand-computed tiny tensors: slerp, nuslerp, multislerp,
karcher, model_stock, nearswap, passthrough and arcee_fusion (reductions and bad input too)."""

from __future__ import annotations

import math

import pytest
import torch

import mergeops
from mergeops.methods.averaging.slerp import Slerp, SlerpParams
from mergeops.methods.base import MergeContext, NoModelParams, TensorInputs

R = math.sqrt(0.5)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _merge(method: str, models: dict, base: dict | None = None, **params) -> dict:
    return mergeops.merge(method, models, base=base, device="cpu", **params)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got, expected)


def _error(method: str, models: dict, base: dict | None = None, **params) -> str:
    with pytest.raises(mergeops.MergeError) as info:
        _merge(method, models, base, **params)
    return str(info.value)


# ---- slerp ---------------------------------------------------------------------------------
BASE = {"w": _t(2.0, 0.0, 0.0)}
OTHER = {"w": _t(0.0, 3.0, 0.0)}


def test_slerp_midpoint_of_orthogonal_tensors():
    # Ω = π/2: θ = sin(π/4)·a + sin(π/4)·b
    out = _merge("slerp", {"b": OTHER}, BASE, t=0.5)
    _close(out["w"], _t(2 * R, 3 * R, 0.0))


@pytest.mark.parametrize(("t", "expected"), [(0.0, BASE["w"]), (1.0, OTHER["w"])])
def test_slerp_ends_are_base_and_other(t, expected):
    out = _merge("slerp", {"b": OTHER}, BASE, t=t)
    assert torch.equal(out["w"], expected)


def test_slerp_of_parallel_tensors_is_linear():
    out = _merge("slerp", {"b": {"w": _t(2.0, 4.0, 6.0)}}, {"w": _t(1.0, 2.0, 3.0)}, t=0.25)
    _close(out["w"], _t(1.25, 2.5, 3.75))


def test_slerp_errors_name_the_count_and_the_parameter():
    message = _error("slerp", {"b": OTHER, "c": OTHER}, BASE, t=0.5)
    assert message == "method 'slerp' needs exactly 1 model besides the base; got 2: 'b', 'c'"
    assert "needs a base model" in _error("slerp", {"a": BASE, "b": OTHER}, t=0.5)
    assert "t: Field required" in _error("slerp", {"b": OTHER}, BASE)


def test_slerp_reads_t_on_every_call():
    """The engine may set per-tensor params (mergekit gradients) before each call."""
    method = Slerp()
    ctx = MergeContext(
        method="slerp",
        model_names=["b"],
        params=SlerpParams(t=0.0),
        model_params=[NoModelParams()],
        device=torch.device("cpu"),
        has_base=True,
    )
    method.validate(ctx)
    inputs = TensorInputs(name="w", models=[OTHER["w"]], base=BASE["w"])
    first = method.merge_tensor(inputs, ctx).merged
    ctx.params = SlerpParams(t=1.0)
    second = method.merge_tensor(inputs, ctx).merged
    assert first is not None and torch.equal(first, BASE["w"])
    assert second is not None and torch.equal(second, OTHER["w"])


# ---- nuslerp -------------------------------------------------------------------------------
def test_nuslerp_t_is_the_second_weights_share():
    # t = 3 / (1 + 3); orthogonal unit vectors: [sin((1-t)π/2), sin(tπ/2), 0]
    x, y = {"w": _t(1.0, 0.0, 0.0)}, {"w": _t(0.0, 1.0, 0.0)}
    out = _merge("nuslerp", {"x": x, "y": y}, weight=[1.0, 3.0])
    _close(out["w"], _t(math.sin(math.pi / 8), math.sin(3 * math.pi / 8), 0.0))


def test_nuslerp_with_a_base_slerps_task_vectors():
    base = {"w": _t(1.0, 1.0, 1.0)}
    x, y = {"w": _t(2.0, 1.0, 1.0)}, {"w": _t(1.0, 2.0, 1.0)}
    out = _merge("nuslerp", {"x": x, "y": y}, base, weight=1.0)
    _close(out["w"], _t(1 + R, 1 + R, 1.0))


def test_nuslerp_weights_summing_to_zero_take_the_midpoint():
    x, y = {"w": _t(1.0, 0.0)}, {"w": _t(0.0, 1.0)}
    out = _merge("nuslerp", {"x": x, "y": y}, weight=[1.0, -1.0])
    _close(out["w"], _t(R, R))


def test_nuslerp_row_wise_and_per_row_angles():
    # columns (row_wise): column 0 orthogonal -> (R, R); column 1 parallel -> linear (1, 1)
    x = {"w": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}
    y = {"w": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    cols = _merge("nuslerp", {"x": x, "y": y}, weight=1.0, nuslerp_flatten=False,
                  nuslerp_row_wise=True)  # fmt: skip
    _close(cols["w"], torch.tensor([[R, 1.0], [R, 1.0]]))
    # rows (last dimension): row 0 orthogonal, row 1 parallel
    x = {"w": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    y = {"w": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    rows = _merge("nuslerp", {"x": x, "y": y}, weight=1.0, nuslerp_flatten=False)
    _close(rows["w"], torch.tensor([[R, R], [1.0, 1.0]]))


def test_nuslerp_errors():
    x, y = {"w": _t(1.0, 0.0)}, {"w": _t(0.0, 1.0)}
    message = _error("nuslerp", {"x": x, "y": y})
    assert "model 'x'" in message and "weight: Field required" in message
    message = _error("nuslerp", {"x": x, "y": y, "z": y}, weight=1.0)
    assert message == "method 'nuslerp' needs exactly 2 models; got 3: 'x', 'y', 'z'"


# ---- multislerp ----------------------------------------------------------------------------
def test_multislerp_scales_the_spherical_mean_by_the_mean_norm():
    # directions (1,0), (0,1) -> (R, R); weighted mean norm (2 + 4) / 2 = 3
    out = _merge("multislerp", {"x": {"w": _t(2.0, 0.0)}, "y": {"w": _t(0.0, 4.0)}}, weight=1.0)
    _close(out["w"], _t(3 * R, 3 * R))


def test_multislerp_with_a_base_and_unnormalized_weights():
    base = {"w": _t(1.0, 1.0)}
    models = {"x": {"w": _t(3.0, 1.0)}, "y": {"w": _t(1.0, 5.0)}}
    out = _merge("multislerp", models, base, weight=1.0)
    _close(out["w"], _t(1 + 3 * R, 1 + 3 * R))
    # weights 0.5 each without normalisation are the same weights
    raw = _merge("multislerp", models, base, weight=0.5, normalize_weights=False)
    _close(raw["w"], out["w"])


def test_multislerp_one_model_and_antipodal_inputs():
    x = {"w": _t(1.0, -2.0, 3.0)}
    assert torch.equal(_merge("multislerp", {"x": x}, weight=1.0)["w"], x["w"])
    # two antipodal models fall back to the linear average
    pair = _merge("multislerp", {"x": {"w": _t(1.0, 0.0)}, "y": {"w": _t(-1.0, 0.0)}}, weight=1.0)
    _close(pair["w"], _t(0.0, 0.0))
    models = {"x": {"w": _t(1.0, 0.0)}, "y": {"w": _t(-1.0, 0.0)}, "z": {"w": _t(1.0, 0.0)}}
    message = _error("multislerp", models, weight=[1.0, 2.0, 1.0])
    assert "tensor 'w'" in message and "['x', 'y', 'z']" in message


# ---- karcher -------------------------------------------------------------------------------
def test_karcher_mean_of_two_directions():
    out = _merge("karcher", {"x": {"w": _t(2.0, 0.0, 0.0)}, "y": {"w": _t(0.0, 4.0, 0.0)}})
    _close(out["w"], _t(3 * R, 3 * R, 0.0))


def test_karcher_takes_no_base():
    """(mergekit configs pass ``base_model`` as one more model: see the parity tests)"""
    out = _merge("karcher", {"x": {"w": _t(3.0, 0.0)}}, {"w": _t(0.0, 3.0)})
    assert torch.equal(out["w"], _t(3.0, 0.0))


def test_karcher_single_model_identical_models_and_zero_iterations():
    x = {"w": _t(1.0, -2.0, 3.0)}
    assert torch.equal(_merge("karcher", {"x": x})["w"], x["w"])
    _close(_merge("karcher", {"x": x, "y": x, "z": x})["w"], x["w"])
    # max_iter 0: the normalised Euclidean mean direction (R, R) times mean norm 1
    out = _merge("karcher", {"x": {"w": _t(1.0, 0.0)}, "y": {"w": _t(0.0, 1.0)}}, max_iter=0)
    _close(out["w"], _t(R, R))
    assert "max_iter" in _error("karcher", {"x": x, "y": x}, max_iter=-1)


# ---- model_stock ---------------------------------------------------------------------------
STOCK_BASE = {"w": _t(1.0, 2.0, 3.0)}


def test_model_stock_identical_models_give_the_model():
    model = {"w": _t(2.0, 0.0, 5.0)}
    out = _merge("model_stock", {"a": model, "b": model, "c": model}, STOCK_BASE)
    _close(out["w"], model["w"])


def test_model_stock_ratio_from_the_pairwise_cosine():
    # δ1 = (1,1,0), δ2 = (1,0,1): cos 0.5, t = 2·0.5 / 1.5 = 2/3; mean δ = (1, .5, .5)
    models = {"a": {"w": _t(2.0, 3.0, 3.0)}, "b": {"w": _t(2.0, 2.0, 4.0)}}
    out = _merge("model_stock", models, STOCK_BASE)
    _close(out["w"], _t(1 + 2 / 3, 2 + 1 / 3, 3 + 1 / 3))
    # orthogonal task vectors: cos 0, t 0 -> the base; opposite ones: singular -> the base
    ortho = {"a": {"w": _t(2.0, 2.0, 3.0)}, "b": {"w": _t(1.0, 3.0, 3.0)}}
    assert torch.equal(_merge("model_stock", ortho, STOCK_BASE)["w"], STOCK_BASE["w"])
    opposite = {"a": {"w": _t(2.0, 2.0, 3.0)}, "b": {"w": _t(0.0, 2.0, 3.0)}}
    assert torch.equal(_merge("model_stock", opposite, STOCK_BASE)["w"], STOCK_BASE["w"])


def test_model_stock_filter_wise_has_one_ratio_per_row():
    base = {"w": torch.zeros(2, 2)}
    a = {"w": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}
    b = {"w": torch.tensor([[0.0, 1.0], [1.0, 1.0]])}
    # row 0 orthogonal -> base row; row 1 identical -> the models' row
    out = _merge("model_stock", {"a": a, "b": b}, base, filter_wise=True)
    _close(out["w"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    whole = _merge("model_stock", {"a": a, "b": b}, base)  # cos 2/3 for the whole tensor
    t = 2 * (2 / 3) / (1 + 2 / 3)
    _close(whole["w"], t * torch.tensor([[0.5, 0.5], [1.0, 1.0]]))


def test_model_stock_needs_two_models():
    message = _error("model_stock", {"a": {"w": _t(1.0, 1.0, 1.0)}}, STOCK_BASE)
    assert message == "method 'model_stock' needs at least 2 models besides the base; got 1: 'a'"


# ---- nearswap ------------------------------------------------------------------------------
NEAR_BASE = {"w": _t(0.0, 0.0, 0.0, 0.0)}
NEAR = {"w": _t(0.05, 0.1, -0.2, 1.0)}


def test_nearswap_moves_close_entries_fully_and_far_ones_by_t_over_distance():
    out = _merge("nearswap", {"n": NEAR}, NEAR_BASE, t=0.1)
    # w = clamp(0.1/|Δ|) = (1, 1, 0.5, 0.1)
    _close(out["w"], _t(0.05, 0.1, -0.1, 0.1))


def test_nearswap_limits():
    assert torch.equal(_merge("nearswap", {"n": NEAR}, NEAR_BASE, t=0.0)["w"], NEAR_BASE["w"])
    assert torch.equal(_merge("nearswap", {"n": NEAR}, NEAR_BASE, t=10.0)["w"], NEAR["w"])
    same = _merge("nearswap", {"n": NEAR}, NEAR, t=0.5)
    assert torch.equal(same["w"], NEAR["w"])


def test_nearswap_errors():
    assert "t: Field required" in _error("nearswap", {"n": NEAR}, NEAR_BASE)
    message = _error("nearswap", {"n": NEAR, "m": NEAR}, NEAR_BASE, t=0.1)
    assert message == "method 'nearswap' needs exactly 1 model besides the base; got 2: 'n', 'm'"


# ---- passthrough ---------------------------------------------------------------------------
def test_passthrough_copies_or_scales_one_model():
    x = {"w": _t(1.0, -2.0, 3.0)}
    assert torch.equal(_merge("passthrough", {"x": x})["w"], x["w"])
    _close(_merge("passthrough", {"x": x}, scale=0.5)["w"], _t(0.5, -1.0, 1.5))
    message = _error("passthrough", {"x": x, "y": x})
    assert message == "method 'passthrough' needs exactly 1 model; got 2: 'x', 'y'"


# ---- arcee_fusion --------------------------------------------------------------------------
def test_arcee_fusion_keeps_only_outlying_changes():
    # 1-D: one KL factor, so the importance ranks |Δ| = (1..7, 100): q1 = 2, median 4, q3 = 6,
    # threshold 4 + 1.5·4 = 10 (times KL) -> only the last change survives
    base = torch.full((8,), 0.1)
    delta = _t(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0)
    out = _merge("arcee_fusion", {"ft": {"w": base + delta}}, {"w": base})
    _close(out["w"], base + _t(0, 0, 0, 0, 0, 0, 0, 100.0))


def test_arcee_fusion_of_identical_models_is_the_base_and_two_models_fail():
    base = {"w": _t(0.5, -1.0, 2.0)}
    assert torch.equal(_merge("arcee_fusion", {"ft": base}, base)["w"], base["w"])
    message = _error("arcee_fusion", {"a": base, "b": base}, base)
    assert (
        message == "method 'arcee_fusion' needs exactly 1 model besides the base; got 2: 'a', 'b'"
    )
