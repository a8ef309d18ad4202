"""Synthetic Llama-shaped checkpoints for the merge-engine benchmark.

``write_family(root, shape=..., finetunes=4)`` writes ``root/base`` and ``root/ft-1..N``:
random bf16 weights (seeded per tensor, so the same seed gives identical files), sharded
safetensors with ``model.safetensors.index.json`` and a Llama ``config.json`` that mergekit's
``llama`` architecture accepts. A fine-tune is the base plus small seeded noise, so its task
vector is dense and meaningful for TIES trimming.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergeops.io.writer import ShardedWriter

INIT_STD = 0.02
"""Std of the base's matrices (norm weights are 1 ± 0.1)."""
FINETUNE_SCALE = 0.05
"""A fine-tune's noise std relative to the tensor's own scale (many bf16 ulps)."""


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that fix every tensor's shape."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Tensor names (in file order) and shapes, as a Llama causal LM names them."""
        h, i = self.hidden, self.intermediate
        yield "model.embed_tokens.weight", (self.vocab, h)
        for n in range(self.layers):
            p = f"model.layers.{n}"
            yield f"{p}.input_layernorm.weight", (h,)
            for proj in ("q", "k", "v", "o"):
                yield f"{p}.self_attn.{proj}_proj.weight", (h, h)
            yield f"{p}.post_attention_layernorm.weight", (h,)
            yield f"{p}.mlp.gate_proj.weight", (i, h)
            yield f"{p}.mlp.up_proj.weight", (i, h)
            yield f"{p}.mlp.down_proj.weight", (h, i)
        yield "model.norm.weight", (h,)
        yield "lm_head.weight", (self.vocab, h)

    @property
    def parameters(self) -> int:
        """Total parameter count."""
        return sum(math.prod(shape) for _, shape in self.tensor_shapes())

    def hf_config(self) -> dict[str, object]:
        """A transformers ``LlamaConfig`` dict (untied embeddings, like the tensors)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }

    def file_bytes(self) -> int:
        """Tensor bytes of one bf16 checkpoint of this shape (headers not counted)."""
        return 2 * self.parameters


# Same tensor shapes for 100m, 270m and 1b (only the layer count differs), so peak memory of a
# streaming merge should not change between them; 3b doubles the hidden size (Llama-3.2-3B-like
# proportions: intermediate 2.75x hidden, head dim 128) for realistic ~3B tensors, 4x the
# elements of the smaller sizes' matrices. "tiny" is for smoke tests.
SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(vocab=512, hidden=64, intermediate=176, layers=2, heads=4),
    "100m": LlamaShape(vocab=32000, hidden=1024, intermediate=2816, layers=3, heads=16),
    "270m": LlamaShape(vocab=32000, hidden=1024, intermediate=2816, layers=16, heads=16),
    "1b": LlamaShape(vocab=32000, hidden=1024, intermediate=2816, layers=73, heads=16),
    "3b": LlamaShape(vocab=32000, hidden=2048, intermediate=5632, layers=56, heads=16),
}


def _generator(seed: int, name: str, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{stream}:{name}".encode()))


def synth_tensor(name: str, shape: tuple[int, ...], *, seed: int, finetune: int) -> torch.Tensor:
    """The bf16 tensor ``name`` of the base (``finetune`` 0) or of fine-tune ``finetune``."""
    is_norm = name.endswith("norm.weight")
    scale = 1.0 if is_norm else INIT_STD
    # In place (the same roundings as ``randn * s``, ``+= noise * c``): a 3b embedding is
    # 262 MB in float32, so every temporary avoided counts.
    values = torch.randn(shape, generator=_generator(seed, name, 0)).mul_(0.1 if is_norm else scale)
    if is_norm:
        values += 1.0
    if finetune:
        noise = torch.randn(shape, generator=_generator(seed, name, finetune))
        values += noise.mul_(FINETUNE_SCALE * scale)
        del noise
    return values.to(torch.bfloat16)


def write_model(
    folder: Path, shape: LlamaShape, *, seed: int, finetune: int, shard_size: int | str
) -> int:
    """Write one checkpoint folder (shards, index, config.json); returns tensor bytes.

    Tensors are made one at a time and the writer flushes every full shard, so memory stays
    at about one shard plus one tensor (in float32 while it is made) whatever the model size.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with ShardedWriter(folder, max_shard_size=shard_size) as writer:
        for name, tensor_shape in shape.tensor_shapes():
            writer.add(name, synth_tensor(name, tensor_shape, seed=seed, finetune=finetune))
    (folder / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
    return writer.bytes_written


def write_family(
    root: Path,
    *,
    shape: LlamaShape,
    finetunes: int = 4,
    seed: int = 0,
    shard_size: int | str = "256MB",
) -> list[Path]:
    """Write ``root/base`` and ``root/ft-1..finetunes``; returns [base, ft-1, ...] folders.

    Folders that already hold a complete checkpoint of this shape and seed are kept.
    """
    folders = [root / "base"] + [root / f"ft-{t}" for t in range(1, finetunes + 1)]
    stamp = json.dumps({"shape": shape.hf_config(), "seed": seed, "shard_size": str(shard_size)})
    for index, folder in enumerate(folders):
        marker = folder / ".synth-stamp"
        if marker.is_file() and marker.read_text() == stamp:
            continue
        if folder.exists():
            for stale in folder.iterdir():
                stale.unlink()
        write_model(folder, shape, seed=seed, finetune=index, shard_size=shard_size)
        marker.write_text(stamp)
    return folders
