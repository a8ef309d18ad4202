"""pleas on tiny Llamas: least squares through linear units (q/k/v, o_proj, gate/up,
down_proj) and wider MLP blocks in memory."""

from __future__ import annotations

import os

import pytest
import torch

from mergeops.methods.alignment.pleas import (
    PleasParams,
    pleas_maps,
    pleas_merge,
    pleas_output_shapes,
    pleas_output_widths,
    unit_errors,
)
from mergeops.methods.base import MergeError
from mergeops.sources import LinearUnitProbe, NeuronLayer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _config(**overrides):
    from transformers import LlamaConfig

    sizes = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=32)  # fmt: skip
    return LlamaConfig(**{**sizes, **overrides})


def _model(seed: int) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    params = {k: v.detach().clone() for k, v in LlamaForCausalLM(_config()).state_dict().items()}
    for key in params:
        if "norm" in key:  # not all ones, so the norms matter
            params[key] = params[key] + 0.2 * torch.randn(params[key].shape)
    return params


@pytest.fixture(scope="module")
def setup():
    from bench.lmzoo.features import LlamaFeatureProbe

    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(4))
    return _model(0), _model(1), LlamaFeatureProbe(_config(), ids)


def test_probe_declares_units_in_forward_order(setup):
    _, _, probe = setup
    assert isinstance(probe, LinearUnitProbe)
    units = probe.linear_units()
    assert [u.weight.split(".", 3)[-1] for u in units[:7]] == [
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]  # fmt: skip
    assert [u.layer for u in units[:7]] == ["heads.0"] * 3 + ["residual"] + ["mlp.0"] * 2 + [
        "residual"
    ]
    with pytest.raises(KeyError, match=r"attn_in\.9"):
        probe.unit_inputs(setup[0], ["attn_in.9"])


def test_least_squares_cuts_the_error_against_the_mapped_average(setup):
    a, b, probe = setup
    errors = {}
    for ls in (False, True):
        params = PleasParams(least_squares=ls)
        merged = pleas_merge([a, b], probe, params)
        errors[ls] = unit_errors(merged, [a, b], pleas_maps([a, b], probe, params), probe)
    assert set(errors[True]) == {u.weight for u in probe.linear_units()}
    # every unit reproduces the models' mapped average better than steps 1-2 alone
    assert sum(errors[True].values()) < 0.5 * sum(errors[False].values())
    worse = [k for k in errors[True] if errors[True][k] > errors[False][k] + 1e-6]
    assert not worse, worse


def test_a_model_merged_with_itself_stays_itself(setup):
    a, _, probe = setup
    merged = pleas_merge([a, a], probe)
    for key, tensor in a.items():
        assert torch.allclose(merged[key], tensor, atol=1e-5), key


def test_wider_mlp_blocks_load_into_a_wider_llama(setup):
    from transformers import LlamaForCausalLM

    a, b, probe = setup
    layers = probe.layer_order()
    widths = pleas_output_widths(a, layers, 1.5)
    assert widths == {"residual": 16, "heads.0": 16, "mlp.0": 36, "heads.1": 16, "mlp.1": 36}
    wide = pleas_merge([a, b], probe, PleasParams(width_factor=1.5))
    shapes = pleas_output_shapes(a, layers, 1.5)
    assert {k: tuple(v.shape) for k, v in wide.items()} == shapes
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (16, 36)
    net = LlamaForCausalLM(_config(intermediate_size=widths["mlp.0"])).eval()
    net.load_state_dict(wide, strict=True)
    with torch.no_grad():
        logits = net(probe.input_ids).logits
    narrow = probe.logits(pleas_merge([a, b], probe))
    assert torch.isfinite(logits).all()
    assert (logits - narrow).abs().max() < 0.1 * narrow.abs().max()


def test_wider_merge_refuses_grouped_layers_that_would_widen(setup):
    a, b, probe = setup

    class Widened:
        def __init__(self, inner):
            self.inner = inner

        def layer_order(self):
            return [layer._replace(widen=True) for layer in self.inner.layer_order()]

        def features(self, params, layer):
            return self.inner.features(params, layer)

        def layer_inputs(self, params, layer):
            return self.inner.layer_inputs(params, layer)

    with pytest.raises(MergeError, match=r"layer 'heads\.0' moves in groups of 8"):
        pleas_merge([a, b], Widened(probe), PleasParams(width_factor=1.5))
    with pytest.raises(MergeError, match="exactly 2 models, got 3"):
        pleas_merge([a, b, a], probe, PleasParams(width_factor=1.5))
    assert NeuronLayer("x", None, None, (), ()).widen  # additive field, default on
