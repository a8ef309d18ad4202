"""Cost of TIES's two tie rules on one large tensor: ``position`` (kthvalue, no sort) and
``mergekit`` (mergekit's unstable argsort, run only when equal magnitudes straddle the cut),
next to mergekit's own ``sparsify.magnitude``.

    OMP_NUM_THREADS=1 python -m bench.tie_break --numel 33554432 --density 0.2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from mergeops.ops.selection import TieBreak, topk_mask_by


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(numel: int, density: float, with_mergekit: bool) -> list[tuple[str, str, str]]:
    """(data, rule, result) rows: float32 normal data (no ties at the cut) and the same data
    rounded to bfloat16 (the cut falls inside a group of equal magnitudes); with mergekit, its
    own time and whether mergekit mode kept exactly mergekit's entries."""
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(numel, generator=gen)
    data = {"float32 normal": smooth, "bf16-rounded": smooth.bfloat16().float()}
    rows = []
    for label, tensor in data.items():
        rules: list[TieBreak] = ["position", "mergekit"]
        for rule in rules:
            seconds = _seconds(lambda t=tensor, r=rule: topk_mask_by(t, density, r))
            rows.append((label, rule, f"{seconds:7.2f} s"))
        if with_mergekit:
            from mergekit.sparsify import magnitude

            seconds = _seconds(lambda t=tensor: magnitude(t, density))
            rows.append((label, "mergekit itself", f"{seconds:7.2f} s"))
            same = torch.equal(magnitude(tensor, density) != 0,
                               topk_mask_by(tensor, density, "mergekit"))  # fmt: skip
            rows.append((label, "kept set", "same as mergekit" if same else "DIFFERS"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 25, help="tensor size (default 32M)")
    parser.add_argument("--density", type=float, default=0.2, help="fraction kept")
    parser.add_argument("--no-mergekit", action="store_true", help="skip mergekit's own timing")
    args = parser.parse_args()
    for label, rule, result in run(args.numel, args.density, not args.no_mergekit):
        print(f"{label:16s} {rule:16s} {result}")


if __name__ == "__main__":
    main()
