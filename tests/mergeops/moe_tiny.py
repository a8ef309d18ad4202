"""Tiny Mixtral / Qwen2-MoE / Llama models built in code for the MoE tests (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = {
    "vocab_size": 48,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def mixtral(seed: int = 0, *, experts: int = 4, per_token: int = 2):  # type: ignore[no-untyped-def]
    """A 2-layer Mixtral with ``experts`` experts per layer, seeded."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        **SIZES, intermediate_size=24, num_local_experts=experts, num_experts_per_tok=per_token
    )
    return MixtralForCausalLM(config).eval()


def qwen2_moe(seed: int = 0, *, experts: int = 4):  # type: ignore[no-untyped-def]
    """A 2-layer Qwen2-MoE with a shared expert and ``experts`` routed experts per layer."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen2MoeConfig(
        **SIZES,
        intermediate_size=32,
        moe_intermediate_size=12,
        shared_expert_intermediate_size=16,
        num_experts=experts,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(config).eval()


def llama(seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-layer dense Llama of the same sizes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SIZES, intermediate_size=24)).eval()


def save(model, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    model.save_pretrained(directory)
    return directory


def nudged(model, seed: int, scale: float = 0.02):  # type: ignore[no-untyped-def]
    """A copy of ``model`` with small seeded noise on every weight: a stand-in fine-tune."""
    import copy

    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return tuned


def calibration(count: int = 4, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, SIZES["vocab_size"], (1, length), generator=generator)
        for _ in range(count)
    ]


def qwen3_moe(seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-layer Qwen3-MoE with 4 experts per layer."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        **SIZES,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
    )
    return Qwen3MoeForCausalLM(config).eval()


def deepseek_v3(seed: int = 0):  # type: ignore[no-untyped-def]
    """A 2-layer DeepSeek-V3: layer 0 dense, layer 1 with 4 routed experts + a shared expert."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    sizes = {**SIZES, "num_key_value_heads": 2}
    config = DeepseekV3Config(
        **sizes,
        intermediate_size=32,
        moe_intermediate_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=4,
    )
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # a non-zero correction bias, so cutting it to the groups is visible
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.arange(4.0) / 10)
    return model
