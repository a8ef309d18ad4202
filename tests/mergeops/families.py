"""Small model families for merge tests."""

from __future__ import annotations

import torch


def tied_family(
    seed: int, count: int = 3
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A bf16 base and ``count`` fine-tunes whose task vectors are small multiples of 1/4096:
    many equal magnitudes, so cuts fall inside tie groups."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": (torch.randn(64, 128, generator=g) * 0.02).bfloat16()}
    models = [
        {"w": (base["w"].float() + (torch.randn(64, 128, generator=g) * 16).round() / 4096)
         .bfloat16()}
        for _ in range(count)
    ]  # fmt: skip
    return base, models
