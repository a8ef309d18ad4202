"""Layer naming for slices: which tensors belong to decoder layer N, and the rest.

Generic rule for Llama/Mistral/Qwen/Gemma-style checkpoints: a tensor named
``<prefix>layers.<N>.<rest>`` belongs to layer N (the first ``layers.<N>.`` in the name);
everything else is a *pre* weight (names containing ``embed``: token/position embeddings,
merged from the first slice's sources) or a *post* weight (final norm, ``lm_head``: merged
from the last slice's sources), as mergekit's architecture files list them. Vocabulary
tensors (``embed_tokens``, ``lm_head``, ``wte``, ``embed_out``) have the vocabulary on axis 0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.)(?P<index>\d+)\.(?P<rest>.+)$")
_VOCAB_NAMES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Layout:
    """A checkpoint's tensor names split into pre weights, per-layer names, post weights."""

    pre: list[str]
    layers: list[list[str]]  # layers[i]: the names of layer i with the index written as {}
    post: list[str]
    names: frozenset[str]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, name template with ``{}`` in place of the index), or None."""
    found = _LAYER.match(name)
    if found is None:
        return None
    return int(found["index"]), f"{found['prefix']}{{}}.{found['rest']}"


def is_vocab_tensor(name: str) -> bool:
    """Whether ``name`` holds one row per vocabulary entry (axis 0)."""
    return name.endswith(_VOCAB_NAMES)


def layout(names: list[str]) -> Layout:
    """Split ``names`` (in checkpoint order) into pre weights, layers and post weights."""
    pre: list[str] = []
    post: list[str] = []
    per_layer: dict[int, list[str]] = {}
    for name in names:
        found = layer_of(name)
        if found is not None:
            per_layer.setdefault(found[0], []).append(found[1])
        elif "embed" in name and "norm" not in name:
            pre.append(name)
        else:
            post.append(name)
    count = max(per_layer, default=-1) + 1
    missing = [i for i in range(count) if i not in per_layer]
    if missing:
        raise ValueError(f"layer {missing[0]} has no tensors (layers 0..{count - 1} expected)")
    return Layout(pre, [per_layer[i] for i in range(count)], post, frozenset(names))


def config_layer_count(model_dir: Path) -> int | None:
    """``num_hidden_layers`` (or an equivalent) from a model folder's config.json."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    for scope in (config, config.get("text_config") or {}):
        for key in LAYER_COUNT_KEYS:
            if isinstance(scope.get(key), int):
                return int(scope[key])
    return None
