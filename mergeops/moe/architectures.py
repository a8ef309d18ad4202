"""The MoE architectures ``build_moe`` writes, and the shared expert of a Qwen2-MoE build.

- ``mixtral``: routed experts only (``MixtralForCausalLM``).
- ``qwen2_moe``: routed experts plus one always-on shared expert gated by
  ``sigmoid(shared_expert_gate · x)`` (``Qwen2MoeForCausalLM``, with ``qkv_bias=False`` and
  ``norm_topk_prob=True`` so attention and routing compute what the Llama base and a Mixtral do).

The shared expert is the base's MLP or the average of the fine-tunes' MLPs. Its gate is written
as zeros (``sigmoid(0) = 1/2`` for every token), so with ``shared_expert_weight = w`` the shared
expert's ``down_proj`` is scaled by ``2w`` and every routed expert's by ``1 - w``: the block
computes ``(1 - w) Σ_topk p_i E_i(x) + w S(x)``. DeepSeek-V2/V3 (also shared experts) use
multi-head latent attention, which a Llama base does not have, so they are not build targets.
Qwen2-MoE: https://qwenlm.github.io/blog/qwen-moe/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from mergeops.moe.experts import MoeError

Architecture = Literal["mixtral", "qwen2_moe"]
SharedExpert = Literal["none", "base", "average"]
_MLP = ("gate_proj", "up_proj", "down_proj")
_DENSE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "tie_word_embeddings",
    "head_dim",
    "rope_parameters",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def pick_architecture(architecture: Architecture | None, shared: SharedExpert) -> Architecture:
    """The architecture to write: ``qwen2_moe`` whenever there is a shared expert."""
    if architecture == "mixtral" and shared != "none":
        raise MoeError(
            f"shared_expert='{shared}' needs architecture 'qwen2_moe'; a Mixtral has no shared expert"
        )
    if architecture is not None:
        return architecture
    return "mixtral" if shared == "none" else "qwen2_moe"


def moe_config(
    dense: Any, architecture: Architecture, num_experts: int, experts_per_token: int
) -> Any:
    """The MoE config with the dense (Llama-style) config's sizes and ``num_experts`` experts."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise MoeError(f"base '{dense.model_type}' uses biases; the MoE architectures have none")
    if experts_per_token > num_experts:
        raise MoeError(f"experts_per_token={experts_per_token} exceeds the {num_experts} experts")
    values = {k: getattr(dense, k) for k in _DENSE_KEYS if getattr(dense, k, None) is not None}
    if architecture == "mixtral":
        return MixtralConfig(
            **values, num_local_experts=num_experts, num_experts_per_tok=experts_per_token
        )
    return Qwen2MoeConfig(
        **values,
        moe_intermediate_size=dense.intermediate_size,
        shared_expert_intermediate_size=dense.intermediate_size,
        num_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        qkv_bias=False,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
    )


def shared_mlp(
    base: dict[str, torch.Tensor], mlps: Sequence[dict[str, torch.Tensor]], source: SharedExpert
) -> dict[str, torch.Tensor]:
    """The dense MLP tensors (``model.layers.N.mlp.*``) that become the shared expert."""
    names = [k for k in base if ".mlp." in k]
    if source == "base":
        return {k: base[k] for k in names}
    return {k: torch.stack([m[k] for m in mlps]).mean(dim=0) for k in names}


def add_shared_expert(
    state: dict[str, torch.Tensor],
    shared: dict[str, torch.Tensor] | None,
    layers: int,
    weight: float,
) -> None:
    """Put the shared expert (zeros when ``shared`` is None) and its gate into a Qwen2-MoE state
    dict, and scale the routed experts' ``down_proj`` by ``1 - weight`` (see the module doc)."""
    for layer in range(layers):
        mlp = f"model.layers.{layer}.mlp"
        if shared is None:
            template = state[f"{mlp}.experts.down_proj"][0]
            hidden, inner = template.shape
            state[f"{mlp}.shared_expert.gate_proj.weight"] = torch.zeros(inner, hidden)
            state[f"{mlp}.shared_expert.up_proj.weight"] = torch.zeros(inner, hidden)
            state[f"{mlp}.shared_expert.down_proj.weight"] = torch.zeros(hidden, inner)
            state[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, hidden)
            continue
        for proj in _MLP:
            scale = 2 * weight if proj == "down_proj" else 1.0
            state[f"{mlp}.shared_expert.{proj}.weight"] = shared[f"{mlp}.{proj}.weight"] * scale
        state[f"{mlp}.experts.down_proj"] = state[f"{mlp}.experts.down_proj"] * (1 - weight)
        hidden = state[f"{mlp}.experts.down_proj"].shape[1]
        state[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, hidden)
