"""Where the experts are: layers, experts per layer, routers and shared experts of an MoE checkpoint.

Pure name parsing (no torch), from tensor names alone or with a ``config.json``. Understands the
on-disk layout of Mixtral (``model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight``, router
``...block_sparse_moe.gate.weight``), Qwen2/Qwen3-MoE (``mlp.experts.E.gate_proj/up_proj/down_proj``,
``mlp.gate.weight``, ``mlp.shared_expert.*`` + ``mlp.shared_expert_gate.weight``), DeepSeek-style
(``mlp.experts.E.*`` + ``mlp.shared_experts.*``), and transformers 5's in-memory layout where a
layer's experts are fused into 3-D tensors (``mlp.experts.gate_up_proj`` of shape (E, 2I, H),
``mlp.experts.down_proj`` of shape (E, H, I)), and ckreg's factored experts
(``…experts.E.gate_proj.factor_a`` / ``factor_b``, see ``mergeops.moe.factored``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_MOE_BLOCK = (
    r"(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:block_sparse_moe|mlp|feed_forward|moe))"
)
_PER_EXPERT = re.compile(
    _MOE_BLOCK
    + r"\.experts\.(?P<expert>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?:weight|factor_a|factor_b)$"
)
_FUSED = re.compile(_MOE_BLOCK + r"\.experts\.(?P<proj>[A-Za-z_][A-Za-z0-9_]*)(?:\.weight)?$")
_ROUTER = re.compile(_MOE_BLOCK + r"\.(?:gate|router)\.(?P<part>[A-Za-z0-9_.]+)$")
_SHARED = re.compile(_MOE_BLOCK + r"\.(?P<kind>shared_experts?|shared_expert_gate)\.")

# config.json keys that hold the number of routed experts, by family
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k")


@dataclass(frozen=True)
class MoeLayer:
    """One MoE block: its tensor-name prefix, router, experts and shared experts."""

    index: int
    prefix: str
    num_experts: int
    router: tuple[str, ...] = ()
    expert_tensors: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    fused_tensors: tuple[str, ...] = ()
    shared_tensors: tuple[str, ...] = ()

    @property
    def router_weight(self) -> str | None:
        """The router's (num_experts, hidden) weight, if present."""
        return next((n for n in self.router if n.endswith(".weight")), None)

    @property
    def fused(self) -> bool:
        return bool(self.fused_tensors)


@dataclass(frozen=True)
class MoeLayout:
    """Every MoE block of a checkpoint, in layer order."""

    architecture: str
    layers: tuple[MoeLayer, ...]
    experts_per_token: int | None = None

    @property
    def experts_per_layer(self) -> dict[int, int]:
        return {layer.index: layer.num_experts for layer in self.layers}

    @property
    def num_experts(self) -> int | None:
        """Experts per layer when every MoE layer has the same number, else None."""
        counts = set(self.experts_per_layer.values())
        return counts.pop() if len(counts) == 1 else None

    def tensor_roles(self) -> dict[str, dict[str, Any]]:
        """Each MoE tensor's role: ``{"layer", "role": router|expert|experts|shared, "expert"?}``."""
        roles: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            for name in layer.router:
                roles[name] = {"layer": layer.index, "role": "router"}
            for name in layer.shared_tensors:
                roles[name] = {"layer": layer.index, "role": "shared"}
            for name in layer.fused_tensors:
                roles[name] = {"layer": layer.index, "role": "experts"}
            for expert, names in layer.expert_tensors.items():
                for name in names:
                    roles[name] = {"layer": layer.index, "role": "expert", "expert": expert}
        return roles

    def summary(self) -> dict[str, Any]:
        """A small JSON-able description (what the registry stores in a checkpoint's metadata)."""
        shared = sum(1 for layer in self.layers if layer.shared_tensors)
        return {
            "architecture": self.architecture,
            "moe_layers": len(self.layers),
            "experts_per_layer": self.num_experts
            if self.num_experts is not None
            else {str(k): v for k, v in self.experts_per_layer.items()},
            "experts_per_token": self.experts_per_token,
            "layers_with_shared_experts": shared,
            "routers_missing": [layer.index for layer in self.layers if not layer.router],
        }


def _names_and_shapes(
    tensors: Iterable[str] | Mapping[str, Sequence[int]],
) -> tuple[list[str], Mapping[str, Sequence[int]]]:
    if isinstance(tensors, Mapping):
        return list(tensors), tensors
    return list(tensors), {}


def _architecture(config: Mapping[str, Any] | None, names: Sequence[str]) -> str:
    if config and config.get("model_type"):
        return str(config["model_type"])
    if any(".block_sparse_moe." in n for n in names):
        return "mixtral"
    if any(".shared_experts." in n for n in names):
        return "deepseek"
    if any(".shared_expert." in n for n in names):
        return "qwen2_moe"
    return "unknown"


def config_value(config: Mapping[str, Any] | None, keys: Sequence[str]) -> int | None:
    """The first of ``keys`` set in a config (or its ``text_config``), as an int."""
    if not config:
        return None
    for source in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(source.get(key), int):
                return int(source[key])
    return None


class _Block:
    """Names of one MoE block collected while scanning."""

    def __init__(self, index: int, prefix: str) -> None:
        self.index, self.prefix = index, prefix
        self.router: list[str] = []
        self.experts: dict[int, list[str]] = {}
        self.fused: list[str] = []
        self.shared: list[str] = []

    def count(self, shapes: Mapping[str, Sequence[int]], configured: int | None) -> int:
        if self.experts:
            return len(self.experts)
        for name in self.fused + self.router:
            shape = shapes.get(name)
            if shape and len(shape) >= 2:
                return int(shape[0])
        return configured or 0

    def freeze(self, shapes: Mapping[str, Sequence[int]], configured: int | None) -> MoeLayer:
        return MoeLayer(
            index=self.index,
            prefix=self.prefix,
            num_experts=self.count(shapes, configured),
            router=tuple(sorted(self.router)),
            expert_tensors={e: tuple(sorted(n)) for e, n in sorted(self.experts.items())},
            fused_tensors=tuple(sorted(self.fused)),
            shared_tensors=tuple(sorted(self.shared)),
        )


def _scan(names: Sequence[str]) -> dict[str, _Block]:
    blocks: dict[str, _Block] = {}

    def block(match: re.Match[str]) -> _Block:
        prefix = match["prefix"]
        return blocks.setdefault(prefix, _Block(int(match["layer"]), prefix))

    for name in names:
        if m := _PER_EXPERT.match(name):
            block(m).experts.setdefault(int(m["expert"]), []).append(name)
        elif m := _SHARED.match(name):
            block(m).shared.append(name)
        elif (m := _FUSED.match(name)) and not m["proj"].isdigit():
            block(m).fused.append(name)
    for name in names:  # a router only counts in a block that has experts
        if (m := _ROUTER.match(name)) and m["prefix"] in blocks:
            blocks[m["prefix"]].router.append(name)
    return blocks


def detect_moe(
    tensors: Iterable[str] | Mapping[str, Sequence[int]],
    *,
    config: Mapping[str, Any] | None = None,
) -> MoeLayout | None:
    """The MoE layout of a checkpoint, or None for a dense model.

    ``tensors`` is the tensor names, or names mapped to shapes (shapes let fused 3-D expert
    tensors and routers report their expert count). ``config`` (a parsed config.json) adds the
    architecture name and experts per token.
    """
    names, shapes = _names_and_shapes(tensors)
    blocks = _scan(names)
    blocks = {p: b for p, b in blocks.items() if b.experts or b.fused}
    if not blocks:
        return None
    configured = config_value(config, EXPERT_COUNT_KEYS)
    layers = sorted((b.freeze(shapes, configured) for b in blocks.values()), key=lambda x: x.index)
    return MoeLayout(
        architecture=_architecture(config, names),
        layers=tuple(layers),
        experts_per_token=config_value(config, EXPERTS_PER_TOKEN_KEYS),
    )


def is_moe_config(config: Mapping[str, Any]) -> bool:
    """Whether a config.json declares routed experts."""
    return (config_value(config, EXPERT_COUNT_KEYS) or 0) > 1
