"""Read and replace one MoE layer's experts and router in a state dict, fused or per expert.

Experts come out as ``{"gate", "up", "down"}`` dicts (see ``mergeops.ops.moe``) whichever way the
state dict stores them: transformers 5's fused ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I), or one tensor per expert and projection (Mixtral's ``w1/w3/w2``,
Qwen/DeepSeek's ``gate_proj/up_proj/down_proj``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from mergeops.methods.base import MergeError
from mergeops.moe.layout import MoeLayer
from mergeops.ops.moe import Expert

PER_EXPERT_NAMES = {
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


class MoeError(MergeError):
    """Bad MoE input: names the model, layer or tensor at fault."""


def router_name(layer: MoeLayer) -> str:
    """The router weight's name, or a ``MoeError`` naming the tensor that is missing."""
    if layer.router_weight is None:
        raise MoeError(
            f"MoE layer {layer.index} has experts but no router: missing tensor '{layer.prefix}.gate.weight'"
        )
    return layer.router_weight


def _projection(name: str) -> str:
    short = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if short not in PER_EXPERT_NAMES:
        raise MoeError(
            f"unknown expert projection in '{name}'; expected one of {sorted(PER_EXPERT_NAMES)}"
        )
    return PER_EXPERT_NAMES[short]


def read_experts(state: dict[str, torch.Tensor], layer: MoeLayer) -> list[Expert]:
    """The layer's experts in index order, as float32 ``{"gate", "up", "down"}`` dicts."""
    if layer.fused:
        gate_up = state[f"{layer.prefix}.experts.gate_up_proj"].float()
        down = state[f"{layer.prefix}.experts.down_proj"].float()
        half = gate_up.shape[1] // 2
        return [
            {"gate": gate_up[e, :half], "up": gate_up[e, half:], "down": down[e]}
            for e in range(down.shape[0])
        ]
    experts = []
    for index in sorted(layer.expert_tensors):
        names = layer.expert_tensors[index]
        experts.append({_projection(n): state[n].float() for n in names})
    return experts


def write_experts(
    state: dict[str, torch.Tensor],
    layer: MoeLayer,
    experts: Sequence[Expert],
    router: Mapping[str, torch.Tensor],
) -> None:
    """Replace the layer's experts (renumbered 0..M-1) and router tensors, in each tensor's dtype."""
    router_name(layer)
    for name, tensor in router.items():
        state[name] = tensor.to(state[name].dtype)
    if layer.fused:
        gate_up_name, down_name = (
            f"{layer.prefix}.experts.gate_up_proj",
            f"{layer.prefix}.experts.down_proj",
        )
        dtype = state[down_name].dtype
        state[gate_up_name] = torch.stack([torch.cat([e["gate"], e["up"]]) for e in experts]).to(
            dtype
        )
        state[down_name] = torch.stack([e["down"] for e in experts]).to(dtype)
        return
    template = layer.expert_tensors[min(layer.expert_tensors)]
    dtype = state[template[0]].dtype
    for names in layer.expert_tensors.values():
        for old in names:
            del state[old]
    for index, expert in enumerate(experts):
        for old in template:
            new = re.sub(r"\.experts\.\d+\.", f".experts.{index}.", old)
            state[new] = expert[_projection(old)].to(dtype)
