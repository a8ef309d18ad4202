"""Build tiny Llama-shaped checkpoints (base + 2 fine-tunes) for mergekit parity."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

out = Path(sys.argv[1])
H, INTER, V = 8, 16, 16
shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
for n in ("q", "k", "v", "o"):
    shapes[f"model.layers.0.self_attn.{n}_proj.weight"] = (H, H)
shapes["model.layers.0.mlp.gate_proj.weight"] = (INTER, H)
shapes["model.layers.0.mlp.up_proj.weight"] = (INTER, H)
shapes["model.layers.0.mlp.down_proj.weight"] = (H, INTER)
shapes["model.layers.0.input_layernorm.weight"] = (H,)
shapes["model.layers.0.post_attention_layernorm.weight"] = (H,)
config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "intermediate_size": INTER,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "num_hidden_layers": 1,
    "vocab_size": V,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
gen = torch.Generator().manual_seed(1234)
base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
for name, tensors in [("base", base)] + [
    (f"ft{i}", {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
    for i in (1, 2)
]:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config, indent=1))
