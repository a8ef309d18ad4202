"""Calibration statistics for MoE layers: the tokens each MoE block sees, via forward pre-hooks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def safetensors_shapes(directory: Path) -> dict[str, list[int]]:
    """Tensor name -> shape over every ``*.safetensors`` file of a model folder (headers only)."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            shapes.update({k: list(handle.get_slice(k).get_shape()) for k in handle.keys()})  # noqa: SIM118
    return shapes


@torch.no_grad()
def collect_layer_inputs(
    model: Any, prefixes: Sequence[str], calibration: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """For each MoE block (module name), the (tokens, hidden) inputs it received on ``calibration``."""
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in prefixes}
    handles = []
    for prefix in prefixes:
        module = model.get_submodule(prefix)

        def record(_module: Any, args: tuple[Any, ...], prefix: str = prefix) -> None:
            hidden = args[0]
            seen[prefix].append(hidden.reshape(-1, hidden.shape[-1]).detach().float())

        handles.append(module.register_forward_pre_hook(record))
    try:
        for ids in calibration:
            model(input_ids=ids.reshape(1, -1) if ids.dim() == 1 else ids)
    finally:
        for handle in handles:
            handle.remove()
    return {p: torch.cat(chunks) for p, chunks in seen.items()}


@torch.no_grad()
def calibration_nll(model: Any, calibration: Sequence[torch.Tensor]) -> float:
    """Mean next-token negative log-likelihood of ``model`` over the calibration inputs (a cheap
    before/after quality figure for an expert merge; inputs shorter than 2 tokens are skipped)."""
    total, count = 0.0, 0
    for ids in calibration:
        row = ids.reshape(1, -1) if ids.dim() == 1 else ids
        if row.shape[-1] < 2:
            continue
        logits = model(input_ids=row).logits[:, :-1].float()
        target = row[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )
        total, count = total + float(loss), count + target.numel()
    return total / count if count else float("nan")
