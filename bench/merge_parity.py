"""Output parity for the merge-engine benchmark: how far ckreg's merge is from mergekit's.

``compare`` streams two checkpoints tensor by tensor (fp32) and, for TIES, also reports the
largest difference away from threshold ties, which mergekit breaks with an unstable argsort.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mergeops import TensorSource
from mergeops.io import open_source


@dataclass
class Parity:
    """Differences between ckreg's and mergekit's outputs (fp32)."""

    max_abs: float
    max_rel: float
    mismatched: int
    max_abs_off_ties: float | None = None


def _tie_positions(key: str, sources: list[TensorSource], density: float) -> torch.Tensor:
    """Where some model's |τ_t| equals its per-tensor top-k threshold (TIES tie candidates)."""
    base = sources[0].get(key).float()
    ties = torch.zeros(base.shape, dtype=torch.bool)
    for source in sources[1:]:
        magnitude = (source.get(key).float() - base).abs()
        n = magnitude.numel()
        k = max(1, int(density * n))
        if k < n:
            ties |= magnitude == magnitude.reshape(-1).kthvalue(n - k + 1).values
    return ties


def compare(ours: Path, theirs: Path, *, ties_inputs: list[Path] | None, density: float) -> Parity:
    """Stream both outputs tensor by tensor; with ``ties_inputs`` also the max difference
    away from threshold ties (mergekit breaks those with an unstable argsort)."""
    a, b = open_source(ours), open_source(theirs)
    inputs = [open_source(f) for f in ties_inputs or []]
    if set(a.keys()) != set(b.keys()):
        raise ValueError(f"tensor names differ: {sorted(set(a.keys()) ^ set(b.keys()))[:5]}")
    result = Parity(0.0, 0.0, 0, 0.0 if ties_inputs else None)
    for key in sorted(a.keys()):
        x, y = a.get(key).float(), b.get(key).float()
        diff = (x - y).abs()
        worst = float(diff.max())
        scale = float(y.abs().max())
        result.max_abs = max(result.max_abs, worst)
        result.max_rel = max(result.max_rel, worst / max(scale, 1e-30))
        result.mismatched += int((diff > 1e-6 * scale).sum())
        if ties_inputs and worst > 0:
            off = diff[~_tie_positions(key, inputs, density)]
            result.max_abs_off_ties = max(
                result.max_abs_off_ties or 0.0, float(off.max()) if off.numel() else 0.0
            )
    return result


def format_parity(parity: Parity | None) -> str:
    """One table cell: max abs / rel difference, count above 1e-6, and the off-ties figure."""
    if parity is None:
        return "-"
    text = f"abs {parity.max_abs:.1e} rel {parity.max_rel:.1e} n>1e-6 {parity.mismatched}"
    if parity.max_abs_off_ties is not None:
        text += f" | off-ties abs {parity.max_abs_off_ties:.1e}"
    return text
