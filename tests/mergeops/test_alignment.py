"""pleas and ot_fusion: exact recovery of a permuted model, hand-checked pieces, bad input."""

from __future__ import annotations

import pytest
import torch

import mergeops
from bench.zoo.model import backbone_forward, init_backbone, init_linear
from bench.zoo.multi_init import DigitsFeatureProbe
from mergeops.methods.alignment.pleas import PleasParams, pleas_merge
from mergeops.methods.base import MergeError
from mergeops.ops.alignment import (
    correlation,
    least_squares_layer,
    match_neurons,
    partial_match_maps,
    sinkhorn,
)


def _model(seed: int, hidden: int = 16, features: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = dict(init_backbone(gen, hidden, features))
    for key in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
        params[key] = params[key] + 0.3 * torch.randn(params[key].shape, generator=gen)
    head = init_linear(3, features, gen)
    params.update({f"heads.t.{k}": v for k, v in head.items()})
    return params


def _permuted(params: dict[str, torch.Tensor], p1: torch.Tensor, p2: torch.Tensor):
    out = dict(params)
    for key in ("fc1.weight", "fc1.bias", "norm1.weight", "norm1.bias"):
        out[key] = params[key][p1]
    out["fc2.weight"] = params["fc2.weight"][p2][:, p1]
    for key in ("fc2.bias", "norm2.weight", "norm2.bias"):
        out[key] = params[key][p2]
    out["heads.t.weight"] = params["heads.t.weight"][:, p2]
    return out


@pytest.fixture(scope="module")
def pair():
    a = _model(0)
    p1, p2 = torch.randperm(16, generator=torch.Generator().manual_seed(1)), torch.randperm(8)
    probe = DigitsFeatureProbe(
        torch.randn(256, 64, generator=torch.Generator().manual_seed(2)), ["t"]
    )
    return a, _permuted(a, p1, p2), p1, p2, probe


def _close(merged, ref, atol):
    for key, tensor in ref.items():
        assert torch.allclose(merged[key].float(), tensor, atol=atol), key


def test_matching_recovers_the_permutation(pair):
    a, b, p1, _, probe = pair
    perm = match_neurons(correlation(probe.features(a, "fc1"), probe.features(b, "fc1")))
    # reference neuron i sits at position j of b where p1[j] = i
    assert torch.equal(p1[perm], torch.arange(16))


@pytest.mark.parametrize(
    ("method", "params", "atol"),
    [
        ("pleas", {"least_squares": False}, 1e-6),
        ("pleas", {}, 1e-3),
        ("ot_fusion", {}, 1e-6),
        ("ot_fusion", {"cost": "weight"}, 1e-6),
        ("ot_fusion", {"solver": "sinkhorn", "reg": 0.002, "iters": 2000}, 1e-3),
    ],
)
def test_permuted_copy_merges_back_to_the_model(pair, method, params, atol):
    a, b, _, _, probe = pair
    merged = mergeops.merge(method, {"a": a, "b": b}, objective=probe, **params)
    _close(merged, a, atol)


def test_wider_pleas_keeps_the_function(pair):
    a, b, _, _, probe = pair
    merged = pleas_merge([a, b], probe, PleasParams(width_factor=1.5))
    assert merged["fc1.weight"].shape == (24, 64) and merged["fc2.weight"].shape == (12, 24)
    assert merged["heads.t.weight"].shape == (3, 12)
    x = probe.inputs
    want = backbone_forward(a, x) @ a["heads.t.weight"].T
    got = backbone_forward(merged, x) @ merged["heads.t.weight"].T
    # LayerNorm over a wider layer changes statistics; the logits stay close, not equal
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_partial_match_maps_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.1, 0.8], [0.0, 0.5, 0.3]])
    e_a, e_b = partial_match_maps(sim, 4)  # 2n - m = 2 pairs: (0,0) 0.9 and (1,2) 0.8
    assert e_a.argmax(dim=1).tolist() == [0, 1, 2, 0] and e_a[3].sum() == 0
    assert e_b.argmax(dim=1).tolist() == [0, 2, 0, 1] and e_b[2].sum() == 0
    with pytest.raises(ValueError, match="outside"):
        partial_match_maps(sim, 7)


def test_sinkhorn_marginals_and_limit():
    cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    plan = sinkhorn(cost, reg=0.01)
    assert torch.allclose(plan.sum(1), torch.full((2,), 0.5, dtype=torch.float64))
    assert torch.allclose(plan, torch.eye(2, dtype=torch.float64) / 2, atol=1e-6)
    soft = sinkhorn(cost, reg=100.0)
    assert torch.allclose(soft, torch.full((2, 2), 0.25, dtype=torch.float64), atol=1e-2)


def test_least_squares_recovers_a_linear_map():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    w, b = torch.randn(2, 4), torch.tensor([1.0, -2.0])
    weight, bias = least_squares_layer(x, x @ w.T + b, bias=True, ridge=0.0)
    assert torch.allclose(weight, w, atol=1e-5) and bias is not None
    assert torch.allclose(bias, b, atol=1e-5)


def test_bad_input_names_the_cause(pair):
    a, b, _, _, probe = pair
    with pytest.raises(MergeError, match="needs an objective"):
        mergeops.merge("pleas", {"a": a, "b": b})
    with pytest.raises(MergeError, match="needs features"):
        mergeops.merge("ot_fusion", {"a": a, "b": b}, objective=object())
    wide = _model(5, hidden=24)
    with pytest.raises(MergeError, match=r"shape mismatch for 'fc1\.weight'"):
        mergeops.merge("pleas", {"a": a, "w": wide}, objective=probe)
    with pytest.raises(MergeError, match="width_factor"):
        mergeops.merge("pleas", {"a": a, "b": b, "c": a}, objective=probe, width_factor=1.5)
    headless = DigitsFeatureProbe(probe.inputs, ["other"])
    with pytest.raises(MergeError, match=r"heads\.other\.weight"):
        mergeops.merge("ot_fusion", {"a": a, "b": b}, objective=headless)


def _llama_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.lmzoo.features import LlamaFeatureProbe

    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    a = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    for key in a:
        if "norm" in key:  # not all ones, so a wrong norm permutation shows
            a[key] = a[key] + 0.2 * torch.randn(a[key].shape)
    gen = torch.Generator().manual_seed(4)
    b, pr = dict(a), torch.randperm(16, generator=gen)
    for key, t in a.items():
        if key.endswith(("o_proj.weight", "down_proj.weight")) or "norm" in key:
            b[key] = t[pr]
        elif key.endswith(
            (
                "embed_tokens.weight",
                "lm_head.weight",
                "q_proj.weight",
                "k_proj.weight",
                "v_proj.weight",
                "gate_proj.weight",
                "up_proj.weight",
            )
        ):
            b[key] = t[:, pr]  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}."
        heads = torch.randperm(2, generator=gen)
        rows = (heads[:, None] * 8 + torch.arange(8)).reshape(-1)
        for name in ("q_proj", "k_proj", "v_proj"):
            b[p + f"self_attn.{name}.weight"] = b[p + f"self_attn.{name}.weight"][rows]
        b[p + "self_attn.o_proj.weight"] = b[p + "self_attn.o_proj.weight"][:, rows]
        pm = torch.randperm(24, generator=gen)
        for name in ("gate_proj", "up_proj"):
            b[p + f"mlp.{name}.weight"] = b[p + f"mlp.{name}.weight"][pm]
        b[p + "mlp.down_proj.weight"] = b[p + "mlp.down_proj.weight"][:, pm]
    ids = torch.randint(0, 40, (4, 12), generator=gen)
    return a, b, LlamaFeatureProbe(config, ids)


@pytest.mark.parametrize(("method", "params"), [("pleas", {}), ("ot_fusion", {})])
def test_llama_permuted_through_residual_heads_and_mlps_merges_back(method, params):
    a, b, probe = _llama_pair()
    assert torch.allclose(probe.logits(a), probe.logits(b), atol=1e-4)  # b is a's function
    merged = mergeops.merge(method, {"a": a, "b": b}, objective=probe, **params)
    _close(merged, a, 1e-6)
    with pytest.raises(MergeError, match="cost 'weight'"):
        mergeops.merge("ot_fusion", {"a": a, "b": b}, objective=probe, cost="weight")
