"""The zoo's network as pure functions of named parameter dicts.

The shared backbone (64 -> 128 -> 32 MLP with LayerNorm and ReLU) is what gets merged; each
task keeps its own linear head (``weight``, ``bias``), which is never merged. Writing the
network as functions of dicts makes ``torch.func`` gradients (Fisher, FW's objective) direct.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

Params = Mapping[str, torch.Tensor]

INPUT_DIM = 64
HIDDEN_DIM = 128
FEATURE_DIM = 32


def backbone_shapes(
    hidden: int = HIDDEN_DIM, features: int = FEATURE_DIM
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the backbone tensors, in state-dict order."""
    return {
        "fc1.weight": (hidden, INPUT_DIM),
        "fc1.bias": (hidden,),
        "norm1.weight": (hidden,),
        "norm1.bias": (hidden,),
        "fc2.weight": (features, hidden),
        "fc2.bias": (features,),
        "norm2.weight": (features,),
        "norm2.bias": (features,),
    }


def init_linear(out_dim: int, in_dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator``."""
    bound = 1.0 / in_dim**0.5
    weight = (torch.rand(out_dim, in_dim, generator=generator) * 2 - 1) * bound
    bias = (torch.rand(out_dim, generator=generator) * 2 - 1) * bound
    return {"weight": weight, "bias": bias}


def init_backbone(
    generator: torch.Generator, hidden: int = HIDDEN_DIM, features: int = FEATURE_DIM
) -> dict[str, torch.Tensor]:
    """A freshly initialised backbone."""
    fc1 = init_linear(hidden, INPUT_DIM, generator)
    fc2 = init_linear(features, hidden, generator)
    return {
        "fc1.weight": fc1["weight"],
        "fc1.bias": fc1["bias"],
        "norm1.weight": torch.ones(hidden),
        "norm1.bias": torch.zeros(hidden),
        "fc2.weight": fc2["weight"],
        "fc2.bias": fc2["bias"],
        "norm2.weight": torch.ones(features),
        "norm2.bias": torch.zeros(features),
    }


def backbone_forward(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Features of ``x`` (..., 64) -> (..., features)."""
    h = F.linear(x, params["fc1.weight"], params["fc1.bias"])
    h = F.relu(F.layer_norm(h, h.shape[-1:], params["norm1.weight"], params["norm1.bias"]))
    h = F.linear(h, params["fc2.weight"], params["fc2.bias"])
    return F.relu(F.layer_norm(h, h.shape[-1:], params["norm2.weight"], params["norm2.bias"]))


def logits(backbone: Params, head: Params, x: torch.Tensor) -> torch.Tensor:
    """Class scores of one task's head on top of the backbone."""
    return F.linear(backbone_forward(backbone, x), head["weight"], head["bias"])


def accuracy(backbone: Params, head: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    with torch.no_grad():
        return (logits(backbone, head, x).argmax(-1) == y).float().mean().item()


def mean_loss(backbone: Params, head: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (differentiable in both parameter dicts)."""
    return F.cross_entropy(logits(backbone, head, x), y)


def head_tensors(task: str, head: Params) -> dict[str, torch.Tensor]:
    """A task head under the names it has inside a full checkpoint: ``heads.<task>.weight``."""
    return {f"heads.{task}.{name}": tensor for name, tensor in head.items()}


def head_from(state_dict: Params, task: str) -> dict[str, torch.Tensor] | None:
    """The head of ``task`` carried inside ``state_dict``, or None when it carries none."""
    prefix = f"heads.{task}."
    found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return found or None


def check_backbone(state_dict: Params, *, source: str = "state dict") -> None:
    """Raise ``KeyError``/``ValueError`` naming the tensor if ``state_dict`` lacks a backbone."""
    shapes = {name: tuple(t.shape) for name, t in state_dict.items()}
    hidden = shapes.get("fc1.weight", (HIDDEN_DIM,))[0]
    features = shapes.get("fc2.weight", (FEATURE_DIM,))[0]
    for name, shape in backbone_shapes(hidden, features).items():
        if name not in state_dict:
            raise KeyError(f"{source} lacks backbone tensor {name!r}")
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(
                f"shape mismatch for {name!r} in {source}: expected {shape}, "
                f"got {tuple(state_dict[name].shape)}"
            )
