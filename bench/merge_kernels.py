"""A/B of the blocked vs stacked merge kernels on one synthetic Llama family, in this process.

    python -m bench.merge_kernels [--size 100m] [--methods linear] [--repeats 3]
    python -m bench.merge_kernels --micro [--repeats 5]   # kernels before/after, side by side

Times ``mergeops.merge_files`` on the same files with the blocked in-place kernels (the
weighted sum ``mergeops.ops.basic.blocked_weighted_sum`` and the task-vector combine
``mergeops.ops.blocked_combine``, what the engine uses) and with the stacked references they
replaced (``torch.stack`` + product + ``sum(dim=0)``), alternating the two, and prints each run
(wall and this process's CPU seconds), the medians, the floor of the same files
(``bench.merge_floor``) and whether the two outputs are byte-identical. Peak memory is measured
by ``bench.merge_engine``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import mergeops
from bench._synth import SHAPES, write_family
from bench.merge_floor import measure_floor, median_floor
from mergeops.ops import basic, sign_consensus

WEIGHTS = (1.0, 0.8, 0.6, 0.4)


def stacked_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The reference kernel: one stacked float32 temporary, its product, a sum over dim 0."""
    stacked = torch.stack(list(tensors))
    return (stacked * basic._weights_like(weights, tensors[0])).sum(dim=0)


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        sha.update(path.read_bytes())
    return sha.hexdigest()


def merge_inputs(method: str, folders: list[Path]) -> tuple[Path | None, list[Path]]:
    """(base, models) of a merge: linear averages 4 checkpoints, the others use base + 4."""
    if method == "linear":
        return None, folders[:4]
    return folders[0], folders[1:5]


def _merge(method: str, folders: list[Path], out: Path, kernel: str) -> tuple[float, float, str]:
    """(wall s, CPU s of this process, output digest) of one merge with ``kernel``."""
    shutil.rmtree(out, ignore_errors=True)
    original, blockable = basic.weighted_sum, sign_consensus.blockable
    if kernel == "stacked":
        basic.weighted_sum = stacked_sum  # the modules that imported it by name keep theirs
        _patch_importers(stacked_sum, original)
        sign_consensus.blockable = lambda *_: False  # combine_task_vectors: the reference
    try:
        start, cpu = time.perf_counter(), time.process_time()
        base, models = merge_inputs(method, folders)
        mergeops.merge_files(method, models, base=base, out_dir=out, progress=False,
                             model_params=[{"weight": w} for w in WEIGHTS[: len(models)]],
                             max_shard_size="256MB")  # fmt: skip
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        basic.weighted_sum, sign_consensus.blockable = original, blockable
        _patch_importers(original, stacked_sum)
    digest = _digest(out)
    shutil.rmtree(out, ignore_errors=True)
    return seconds, cpu, digest


def _patch_importers(kernel: object, replacing: object) -> None:
    """Point every mergeops module that imported ``replacing`` by name at ``kernel`` (only
    those: ``mergeops.kernels`` has a ``weighted_sum`` of its own)."""
    import sys

    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith("mergeops.") and getattr(module, "weighted_sum", None) is replacing:
            module.weighted_sum = kernel  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="100m", choices=sorted(SHAPES))
    parser.add_argument("--methods", default="linear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("bench/out/merge_engine"))
    parser.add_argument("--micro", action="store_true",
                        help="time the selection/combine kernels before and after (bench._kernels_micro)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.micro:
        from bench._kernels_micro import run

        run(args.repeats)
        return 0
    folders = write_family(args.work / args.size / "models", shape=SHAPES[args.size])
    os.sync()
    print(f"{args.size}: torch threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for method in [m for m in args.methods.split(",") if m]:
        times: dict[str, list[float]] = {"stacked": [], "blocked": []}
        cpus: dict[str, list[float]] = {"stacked": [], "blocked": []}
        digests: set[str] = set()
        floors = []
        for repeat in range(args.repeats):
            order = ["stacked", "blocked"] if repeat % 2 == 0 else ["blocked", "stacked"]
            base, models = merge_inputs(method, folders)
            inputs = [*models, *([base] if base is not None else [])]
            floors.append(measure_floor(inputs, 2 * sum(
                p.stat().st_size for p in folders[0].glob("*.safetensors")),
                args.work / "floor.bin"))  # fmt: skip
            for kernel in order:
                seconds, cpu, digest = _merge(method, folders, args.work / "out-kernels", kernel)
                times[kernel].append(seconds)
                cpus[kernel].append(cpu)
                digests.add(digest)
                print(f"  run {repeat}: {kernel} {seconds:.2f} s, {cpu:.2f} CPU s "
                      f"(floor {floors[-1].seconds:.2f} s)", flush=True)  # fmt: skip
        floor = median_floor(floors).seconds
        for kernel, runs in times.items():
            med = statistics.median(runs)
            print(f"{method:<16}{kernel:<9} median {med:6.2f} s = {med / floor:4.1f}x floor "
                  f"({floor:.2f} s), {statistics.median(cpus[kernel]):.2f} CPU s; "
                  f"runs {', '.join(f'{r:.2f}' for r in runs)}")  # fmt: skip
        print(f"{method}: outputs byte-identical across kernels: {len(digests) == 1}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
