"""The CUDA merge path's short check (run by ``bench/gpu_check.sh``): parity with the CPU,
throughput of the sliced path, host memory and pinned host-to-device bandwidth.

    python -m bench.gpu_sliced [--size 100m] [--methods linear,task_arithmetic,ties]
    python -m bench.gpu_sliced --device cpu --size tiny   # plumbing only (no GPU)

For each method the same merge (synthetic Llama-shaped bf16 base + 4 fine-tunes, bf16 out,
``bench._synth``) runs twice as its own process, into a folder: on the CPU (the reference) and
on ``--device``, whose pipeline hands the writer its output in row slices. It prints, per
method: max |Δ| over every output element and whether the shards' tensors are bit-identical;
the device merge's in-process seconds and GB/s (input + output safetensors bytes / merge
seconds, also as a share of the pinned H2D bandwidth measured here); and both processes' peak
RSS (``ru_maxrss``) and peak anonymous RSS beside the largest output tensor's size, so memory
that followed whole tensors would show.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench._common import MIB
from bench._measure import folder_bytes, measure
from bench._synth import SHAPES, write_family
from bench.merge_pipeline import h2d_bandwidth, parse_result
from bench.merge_report import Run

METHODS = ("linear", "task_arithmetic", "ties")


def config(path: Path, method: str, folders: list[Path]) -> Path:
    """The merge YAML of one row: the fine-tunes (weights 1.0, 0.8, ...) on the base."""
    base, tunes = folders[0], folders[1:]
    models: list[dict[str, Any]] = []
    for i, folder in enumerate(tunes):
        params: dict[str, Any] = {"weight": round(1.0 - 0.2 * i, 2)}
        if method == "ties":
            params["density"] = 0.5
        models.append({"model": str(folder.resolve()), "name": f"ft-{i + 1}", "parameters": params})
    cfg: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        cfg["base_model"] = str(base.resolve())
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@dataclass
class Parity:
    """How the device output compares with the CPU output."""

    max_abs: float
    tensors: int
    identical: int
    largest: int  # bytes of the largest output tensor


def compare(cpu: Path, device: Path) -> Parity:
    """Max |Δ| and bit-identical tensors between two output folders (same tensor names)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                found |= dict.fromkeys(f.keys(), shard)
        return found

    left, right = tensors(cpu), tensors(device)
    if left.keys() != right.keys():
        raise SystemExit(
            f"error: outputs differ in tensor names: {sorted(left.keys() ^ right.keys())}"
        )
    worst, same, largest = 0.0, 0, 0
    for name in sorted(left):
        with safe_open(str(left[name]), "pt") as f, safe_open(str(right[name]), "pt") as g:
            a, b = f.get_tensor(name), g.get_tensor(name)
        largest = max(largest, a.numel() * a.element_size())
        same += int(a.dtype == b.dtype and torch.equal(a, b))
        if a.is_floating_point():
            worst = max(worst, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
    return Parity(worst, len(left), same, largest)


@dataclass
class Row:
    method: str
    cpu: Run
    dev: Run
    merge_s: float
    moved: int
    parity: Parity | None


def run_method(work: Path, method: str, folders: list[Path], device: str) -> Row:
    """The CPU and device merges of one method, each as its own measured process."""
    cfg = config(work / f"{method}.yml", method, folders)
    runs, outs, seconds = {}, {}, {}
    for where in ("cpu", device) if device != "cpu" else ("cpu", "cpu-again"):
        out = work / f"out-{method}-{where}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"{method}-{where}.log"
        target = "cpu" if where.startswith("cpu") else where
        cmd = [sys.executable, "-m", "bench.merge_pipeline", "run", "--config", str(cfg),
               "--out", str(out), "--device", target]  # fmt: skip
        runs[where], outs[where] = measure(cmd, engine="ckreg", device=target, log=log), out
        parsed = parse_result(log)
        seconds[where] = parsed[0] if parsed else math.nan
        if not runs[where].ok:
            print(f"  {method} on {where}: FAILED; last lines of {log}:")
            print("\n".join(log.read_text().splitlines()[-15:]))
    first, second = list(runs)
    ok = runs[first].ok and runs[second].ok
    parity = compare(outs[first], outs[second]) if ok else None
    inputs = sum(folder_bytes(f) for f in (folders if method != "linear" else folders[1:]))
    moved = inputs + (folder_bytes(outs[second]) if ok else 0)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return Row(method, runs[first], runs[second], seconds[second], moved, parity)


def report(rows: list[Row], h2d: float, device: str) -> str:
    """The table of every method (see the module docstring for the columns)."""
    head = (f"{'method':<16}{'max|Δ|':>9}{'identical':>11}{'merge s':>9}{'GB/s':>7}{'/H2D':>6}"
            f"{'RSS cpu MB':>11}{'RSS dev MB':>11}{'anon dev MB':>12}{'largest MB':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.parity is None:
            lines.append(f"{r.method:<16}FAILED (see the logs above)")
            continue
        p, gbs = r.parity, r.moved / r.merge_s / 1e9
        lines.append(
            f"{r.method:<16}{p.max_abs:>9.2g}{f'{p.identical}/{p.tensors}':>11}{r.merge_s:>9.2f}"
            f"{gbs:>7.2f}{gbs / h2d:>6.2f}{r.cpu.peak_rss / MIB:>11.0f}{r.dev.peak_rss / MIB:>11.0f}"
            f"{r.dev.peak_anon / MIB:>12.0f}{p.largest / MIB:>11.1f}"
        )
    lines.append(f"max|Δ| / identical: {device} output vs the CPU output, every tensor; merge s: "
                 f"merge_files on {device} in its process (after imports and CUDA init); GB/s: "
                 "input + output safetensors bytes / merge s; /H2D: over the pinned host-to-device "
                 "bandwidth measured here; RSS: peak ru_maxrss of each merge process (CUDA's "
                 "context included), anon: peak RssAnon sampled; largest: largest output tensor")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="100m", choices=sorted(SHAPES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu: plumbing only")
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch folder (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the synthetic models")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")  # fmt: skip
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="ckreg-gpu-sliced-"))
    work.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.size]
    folders = write_family(work / "models", shape=shape)
    h2d = h2d_bandwidth() if args.device.startswith("cuda") else math.nan
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.size}: {shape.parameters / 1e6:.0f}M params x 5 bf16 models on {name}; "
          f"pinned H2D {h2d:.1f} GB/s")  # fmt: skip
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = [run_method(work, m, folders, args.device) for m in methods]
    print(report(rows, h2d, args.device), flush=True)
    if not args.keep:
        shutil.rmtree(work / "models", ignore_errors=True)
    return 0 if all(r.parity is not None for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
