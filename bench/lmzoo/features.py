"""The ``FeatureProbe`` of Llama-style models for the alignment methods (pleas, ot_fusion).

Three kinds of neuron layers:

- ``residual``: the hidden size, one permutation through the whole residual stream: rows of
  every ``o_proj``/``down_proj`` and norm, columns of the embeddings, every ``q/k/v/gate/up``
  projection and ``lm_head``. Features: every layer's hidden states, stacked over tokens.
- ``heads.<i>``: layer i's attention heads, moved as wholes (``group`` = head dim, so RoPE's
  pairs stay put): rows of q/k/v, columns of ``o_proj``. Features: ``o_proj``'s input.
  Needs as many key/value heads as query heads (no GQA).
- ``mlp.<i>``: layer i's intermediate neurons: rows of gate/up, columns of ``down_proj``.
  Features: ``down_proj``'s input. The only layers a wider pleas merge widens.

No single weight produces these layers, so pleas's least squares (step 3) re-solves each
block's linear units instead (``LinearUnitProbe``): q/k/v (rows: ``heads.<i>``), ``o_proj``
(rows: ``residual``), gate/up (rows: ``mlp.<i>``), ``down_proj`` (rows: ``residual``), fed
the inputs hooked in one forward (``attn_in/attn_out/mlp_in/mlp_out.<i>``). Embeddings,
norms and ``lm_head`` stay permuted and averaged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergeops.sources import LinearUnit, NeuronLayer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub


def llama_layers(config: Any) -> list[NeuronLayer]:
    """The neuron layers of a ``LlamaConfig``'s model, residual stream first."""
    n, p = config.num_hidden_layers, "model.layers"
    if (
        getattr(config, "num_key_value_heads", config.num_attention_heads)
        != config.num_attention_heads
    ):
        raise ValueError("head alignment needs num_key_value_heads == num_attention_heads (no GQA)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    proj = lambda i, names: tuple(f"{p}.{i}.{n}.weight" for n in names)  # noqa: E731
    rows = [*(k for i in range(n) for k in proj(i, ("self_attn.o_proj", "mlp.down_proj",
                                                    "input_layernorm", "post_attention_layernorm"))),
            "model.norm.weight"]  # fmt: skip
    cols = ["model.embed_tokens.weight", "lm_head.weight",
            *(k for i in range(n) for k in proj(i, ("self_attn.q_proj", "self_attn.k_proj",
                                                    "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")))]  # fmt: skip
    layers = [NeuronLayer("residual", None, None, tuple(rows), tuple(cols), widen=False)]
    for i in range(n):
        layers.append(NeuronLayer(f"heads.{i}", None, None,
                                  proj(i, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  proj(i, ("self_attn.o_proj",)), head_dim, widen=False))  # fmt: skip
        layers.append(NeuronLayer(f"mlp.{i}", None, None, proj(i, ("mlp.gate_proj", "mlp.up_proj")),
                                  proj(i, ("mlp.down_proj",))))  # fmt: skip
    return layers


#: Per block: the input source of each group of linear units, the hooked module, the units'
#: projections and the neuron layer their rows belong to (forward order).
_UNITS = (
    ("attn_in", "self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "heads"),
    ("attn_out", "self_attn.o_proj", ("self_attn.o_proj",), "residual"),
    ("mlp_in", "mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ("mlp_out", "mlp.down_proj", ("mlp.down_proj",), "residual"),
)  # fmt: skip


def llama_units(config: Any) -> list[LinearUnit]:
    """Every block's q/k/v, o_proj, gate/up and down_proj as pleas least-squares units."""
    out = []
    for i in range(config.num_hidden_layers):
        for source, _, names, layer in _UNITS:
            target = layer if layer == "residual" else f"{layer}.{i}"
            out += [LinearUnit(f"model.layers.{i}.{name}.weight", None, target, f"{source}.{i}")
                    for name in names]  # fmt: skip
    return out


class LlamaFeatureProbe:
    """Runs a Llama-style ``transformers`` model under given parameters on ``input_ids``."""

    def __init__(self, config: Any, input_ids: torch.Tensor) -> None:
        from transformers import LlamaForCausalLM

        self.config, self.input_ids = config, input_ids
        self.model = LlamaForCausalLM(config).eval()
        self._layers, self._units = llama_layers(config), llama_units(config)

    def layer_order(self) -> list[NeuronLayer]:
        return self._layers

    def linear_units(self) -> list[LinearUnit]:
        return self._units

    def _run(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One forward under ``params``: every unit source's inputs (``attn_in.<i>`` ...),
        ``heads.<i>``/``mlp.<i>`` features (o_proj's and down_proj's inputs), the residual
        stream and the logits."""
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(self.model.model.layers):
            for source, path, _, _ in _UNITS:
                module = layer.get_submodule(path)
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, name=f"{source}.{i}": captured.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
                ))  # fmt: skip
        params = dict(params)
        if (
            getattr(self.config, "tie_word_embeddings", False)
            and "model.embed_tokens.weight" in params
        ):
            params.pop("lm_head.weight", None)  # the model ties it to the embedding
        try:
            with torch.no_grad():
                out = torch.func.functional_call(self.model, params, (self.input_ids,),
                                                 {"output_hidden_states": True})  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
        for i in range(len(self.model.model.layers)):
            captured[f"heads.{i}"], captured[f"mlp.{i}"] = (captured[f"attn_out.{i}"],
                                                            captured[f"mlp_out.{i}"])  # fmt: skip
        states = out.hidden_states[:-1]  # the last one is after the final norm
        captured["residual"] = torch.cat([h.reshape(-1, h.shape[-1]) for h in states])
        captured["logits"] = out.logits
        return captured

    def features(self, params: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
        found = self._run(params)
        if layer not in found:
            raise KeyError(f"llama probe has no layer {layer!r}")
        return found[layer].float()

    def layer_inputs(self, params: Mapping[str, torch.Tensor], layer: str) -> torch.Tensor:
        raise NotImplementedError(f"llama layer {layer!r} has no single producing weight: "
                                  "pleas solves its linear units (unit_inputs) instead")  # fmt: skip

    def unit_inputs(
        self, params: Mapping[str, torch.Tensor], sources: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        found = self._run(params)
        missing = [s for s in sources if s not in found]
        if missing:
            raise KeyError(f"llama probe has no unit sources {missing}")
        return {s: found[s].float() for s in sources}

    def logits(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits under ``params`` (for checks)."""
        return self._run(params)["logits"]
