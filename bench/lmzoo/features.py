"""The ``FeatureProbe`` of Llama-style models for the alignment methods (pleas, ot_fusion).

Three kinds of neuron layers, all moved by permutations only (no least squares):

- ``residual``: the hidden size, one permutation through the whole residual stream: rows of
  every ``o_proj``/``down_proj`` and norm, columns of the embeddings, every ``q/k/v/gate/up``
  projection and ``lm_head``. Features: every layer's hidden states, stacked over tokens.
- ``heads.<i>``: layer i's attention heads, moved as wholes (``group`` = head dim, so RoPE's
  pairs stay put): rows of q/k/v, columns of ``o_proj``. Features: ``o_proj``'s input.
  Needs as many key/value heads as query heads (no GQA).
- ``mlp.<i>``: layer i's intermediate neurons: rows of gate/up, columns of ``down_proj``.
  Features: ``down_proj``'s input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from mergeops.sources import NeuronLayer

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
    layers = [NeuronLayer("residual", None, None, tuple(rows), tuple(cols))]
    for i in range(n):
        layers.append(NeuronLayer(f"heads.{i}", None, None,
                                  proj(i, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                  proj(i, ("self_attn.o_proj",)), head_dim))  # fmt: skip
        layers.append(NeuronLayer(f"mlp.{i}", None, None, proj(i, ("mlp.gate_proj", "mlp.up_proj")),
                                  proj(i, ("mlp.down_proj",))))  # fmt: skip
    return layers


class LlamaFeatureProbe:
    """Runs a Llama-style ``transformers`` model under given parameters on ``input_ids``."""

    def __init__(self, config: Any, input_ids: torch.Tensor) -> None:
        from transformers import LlamaForCausalLM

        self.config, self.input_ids = config, input_ids
        self.model = LlamaForCausalLM(config).eval()
        self._layers = llama_layers(config)

    def layer_order(self) -> list[NeuronLayer]:
        return self._layers

    def _run(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        hooks = []
        for i, layer in enumerate(self.model.model.layers):
            for name, module in (
                (f"heads.{i}", layer.self_attn.o_proj),
                (f"mlp.{i}", layer.mlp.down_proj),
            ):
                hooks.append(module.register_forward_pre_hook(
                    lambda _m, args, name=name: captured.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))
                ))  # fmt: skip
        try:
            with torch.no_grad():
                out = torch.func.functional_call(self.model, dict(params), (self.input_ids,),
                                                 {"output_hidden_states": True})  # fmt: skip
        finally:
            for hook in hooks:
                hook.remove()
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
        raise NotImplementedError("Llama layers are aligned by permutation only (no least squares)")

    def logits(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's logits under ``params`` (for checks)."""
        return self._run(params)["logits"]
