"""The merge engine's input prefetch and CUDA pipeline, measured (used by ``bench.merge_engine``).

    python -m bench.merge_pipeline run --config M.yml --out DIR --device cuda --prefetch on
    python -m bench.merge_pipeline latency [--ms 5]

``run`` is one merge in this process, timed after imports and CUDA initialisation (it prints
``merge_s=... bytes_read=... bytes_written=...``), so a subprocess measurement can report the
merge itself beside the process's wall time. ``latency`` merges small models from a source that
sleeps on every read (simulated network latency) with prefetch off and on, and prints both
walls: the difference is the read latency hidden behind compute.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench._common import MIB
from bench._synth import SHAPES, LlamaShape, synth_tensor, write_family

RESULT = re.compile(r"merge_s=(\S+) bytes_read=(\d+) bytes_written=(\d+)")


def run_one(config: Path, out: Path, device: str, prefetch: bool) -> None:
    """Run one merge YAML; prints the in-process timing line ``RESULT`` parses."""
    import mergeops
    from mergeops.config import load_config, to_merge_kwargs

    kwargs = to_merge_kwargs(load_config(config), root=config.parent)
    kwargs["device"] = device
    if device.startswith("cuda"):
        torch.zeros(1, device=device)  # CUDA context before the clock starts
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = mergeops.merge_files(out_dir=out, progress=False, prefetch=prefetch, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"merge_s={elapsed:.4f} bytes_read={result.bytes_read} "
          f"bytes_written={result.bytes_written}", flush=True)  # fmt: skip


def parse_result(log: Path) -> tuple[float, int, int] | None:
    """(merge seconds, bytes read, bytes written) from a ``run`` log, or None."""
    match = RESULT.search(log.read_text()) if log.is_file() else None
    if match is None:
        return None
    return float(match.group(1)), int(match.group(2)), int(match.group(3))


def write_moments(folder: Path, shape: LlamaShape, finetune: int) -> Path:
    """Adam-like second moments (positive, bf16) for one synthetic fine-tune."""
    from mergeops.io.writer import ShardedWriter

    marker = folder / ".synth-stamp"
    if marker.is_file():
        return folder
    with ShardedWriter(folder, max_shard_size="256MB") as writer:
        for name, tensor_shape in shape.tensor_shapes():
            noise = synth_tensor(name, tensor_shape, seed=100 + finetune, finetune=finetune)
            writer.add(name, (noise.float().square() + 1e-8).to(torch.bfloat16))
    marker.write_text("moments")
    return folder


def gpu_config(path: Path, method: str, folders: list[Path], moments: list[Path]) -> Path:
    """The merge YAML of one CUDA benchmark row (bf16 output, like the inputs)."""
    base, finetunes = folders[0], folders[1:]
    models: list[dict[str, Any]] = []
    for i, folder in enumerate(finetunes):
        entry: dict[str, Any] = {"model": str(folder.resolve()), "name": f"ft-{i + 1}"}
        if method == "ties":
            entry["parameters"] = {"weight": 1.0 - 0.2 * i, "density": 0.5}
        elif method == "task_arithmetic":
            entry["parameters"] = {"weight": 1.0 - 0.2 * i}
        elif method == "ota_ffg":
            entry["parameters"] = {"density": 0.5}
            entry["second_moment"] = str(moments[i].resolve())
        models.append(entry)
    config: dict[str, Any] = {"merge_method": method, "base_model": str(base.resolve()),
                              "models": models, "dtype": "bfloat16"}  # fmt: skip
    if method == "opcm":
        state = path.with_suffix(".state.safetensors")
        state.unlink(missing_ok=True)
        config["state"] = str(state.resolve())
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class GpuRow:
    """One CUDA merge: process wall, in-process merge time and bytes moved."""

    method: str
    wall_s: float
    merge_s: float
    moved: int
    ok: bool
    log: Path


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder``."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def cuda_rows(
    work: Path,
    folders: list[Path],
    shape: LlamaShape,
    methods: list[str],
    measure: Any,
    device: str = "cuda",
) -> list[GpuRow]:
    """Run each method on ``device`` (bf16 in, bf16 out) as its own process, timed in-process
    (the smoke test runs it on the CPU)."""
    moments = [write_moments(work / "models" / f"v-{i}", shape, i) for i in range(1, len(folders))]
    rows = []
    for method in methods:
        cfg = gpu_config(work / f"{method}-cuda.yml", method, folders, moments)
        out = work / f"out-{method}-cuda"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "bench.merge_pipeline", "run", "--config", str(cfg),
               "--out", str(out), "--device", device]  # fmt: skip
        log = work / f"{method}-{device}.log"
        run = measure(cmd, engine="ckreg", device=device, log=log)
        parsed = parse_result(log)
        inputs = sum(folder_bytes(f) for f in folders)
        if method == "ota_ffg":
            inputs += sum(folder_bytes(m) for m in moments)
        merge_s = parsed[0] if parsed else float("nan")
        moved = inputs + (folder_bytes(out) if out.is_dir() else 0)
        rows.append(GpuRow(method, run.wall_s, merge_s, moved, run.ok and parsed is not None, log))
        shutil.rmtree(out, ignore_errors=True)
    return rows


def format_cuda(rows: list[GpuRow], h2d: float) -> str:
    """The CUDA table: walls, effective bandwidth and its share of pinned H2D bandwidth."""
    head = (f"{'method':<16}{'process s':>10}{'merge s':>9}{'GB moved':>9}{'GB/s':>7}"
            f"{'H2D GB/s':>9}{'/H2D':>7}  goal")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        gbs = r.moved / r.merge_s / 1e9
        goal = ">= 0.50" if r.method in ("ties", "task_arithmetic") else "-"
        state = "" if r.ok else f"  FAILED, see {r.log}"
        lines.append(f"{r.method:<16}{r.wall_s:>10.1f}{r.merge_s:>9.2f}{r.moved / 1e9:>9.2f}"
                     f"{gbs:>7.2f}{h2d:>9.1f}{gbs / h2d:>7.2f}  {goal}{state}")  # fmt: skip
    lines.append("merge s: merge_files in the process, after imports and CUDA init; GB moved: "
                 "input + output safetensors bytes (ota_ffg: + second moments); /H2D: GB/s over "
                 "pinned host-to-device copy_ bandwidth measured in this run")  # fmt: skip
    return "\n".join(lines)


def h2d_bandwidth(chunk: int = 256 * MIB, repeats: int = 8) -> float:
    """GB/s of pinned host -> device copies."""
    host = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(chunk, dtype=torch.uint8, device="cuda")
    device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        device.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return chunk * repeats / (time.perf_counter() - start) / 1e9


def cuda_main(args: argparse.Namespace, sizes: list[str], measure: Any) -> int:
    """``--device cuda``: ckreg on the GPU, each method against pinned H2D bandwidth."""
    if not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda})")  # fmt: skip
        return 2
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, load {os.getloadavg()}, cpus {os.cpu_count()}")  # fmt: skip
    ok = True
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for size in sizes:
        shape = SHAPES[size]
        folders = write_family(args.work / size / "models", shape=shape)
        h2d = h2d_bandwidth()
        print(f"{size}: {shape.parameters / 1e6:.0f}M params x 5 bf16 models; pinned H2D "
              f"{h2d:.1f} GB/s")  # fmt: skip
        rows = cuda_rows(args.work / size, folders, shape, methods, measure)
        print(format_cuda(rows, h2d))
        ok = ok and all(r.ok for r in rows)
        if not args.keep:
            shutil.rmtree(args.work / size / "models")
    return 0 if ok else 1


def prefetch_compare(cfg: Path, work: Path, method: str, measure: Any) -> tuple[float, float]:
    """In-process merge seconds with prefetch off and on (same config, CPU)."""
    seconds = []
    for mode in ("off", "on"):
        out = work / f"out-{method}-prefetch-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        log = work / f"{method}-prefetch-{mode}.log"
        measure([sys.executable, "-m", "bench.merge_pipeline", "run", "--config", str(cfg),
                 "--out", str(out), "--device", "cpu", "--prefetch", mode],
                engine="ckreg", device="cpu", log=log)  # fmt: skip
        parsed = parse_result(log)
        seconds.append(parsed[0] if parsed else float("nan"))
        shutil.rmtree(out, ignore_errors=True)
    return seconds[0], seconds[1]


class SlowSource:
    """An in-memory source that sleeps ``latency`` seconds on every read (like a range GET)."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], latency: float) -> None:
        self.name, self._tensors, self.latency = name, tensors, latency

    def keys(self) -> list[str]:
        return list(self._tensors)

    def metadata(self, key: str) -> Any:
        from mergeops.sources import TensorMeta

        return TensorMeta(self._tensors[key].dtype, tuple(self._tensors[key].shape))

    def get(self, key: str) -> torch.Tensor:
        time.sleep(self.latency)
        return self._tensors[key].clone()

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        time.sleep(self.latency)
        return self._tensors[key][start:stop].clone()


def latency_demo(ms: float, *, layers: int = 6, rows: int = 2048) -> list[tuple[str, float]]:
    """Walls of the same ties merge from sleeping sources with prefetch off and on."""
    import mergeops

    gen = torch.Generator().manual_seed(0)
    shapes = {f"layer.{i}.weight": (rows, 1024) for i in range(layers)} | {"norm": (1024,)}
    base = {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in shapes.items()}
    tunes = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16)
              for k, v in base.items()} for _ in range(4)]  # fmt: skip
    rows = []
    for prefetch in (False, True):
        models = [SlowSource(f"ft-{i}", t, ms / 1000) for i, t in enumerate(tunes)]
        start = time.perf_counter()
        mergeops.merge("ties", models, base=SlowSource("base", base, ms / 1000), device="cpu",
                       density=0.5, prefetch=prefetch)  # fmt: skip
        rows.append((f"prefetch {'on' if prefetch else 'off'}", time.perf_counter() - start))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="one merge, timed in-process")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--device", default="cpu")
    run.add_argument("--prefetch", choices=("on", "off"), default="on")
    lat = sub.add_parser("latency", help="prefetch off/on from sources that sleep per read")
    lat.add_argument("--ms", type=float, default=5.0, help="sleep per read, milliseconds")
    lat.add_argument("--threads", type=int, default=1,
                     help="torch threads (1: on a loaded machine, OpenMP spin-waits between "
                          "kernels would swamp the read latency being measured)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "run":
        run_one(args.config, args.out, args.device, args.prefetch == "on")
        return 0
    torch.set_num_threads(args.threads)
    rows = latency_demo(args.ms)
    print(f"ties, 4 fine-tunes + base, 6 x (2048, 1024) bf16 + norm, {args.ms} ms per read "
          f"(CPU, {args.threads} torch thread(s); reads of 2 MiB-float32 slices):")  # fmt: skip
    for label, wall in rows:
        print(f"  {label:<13} {wall:6.2f} s")
    print(f"  speed-up      {rows[0][1] / rows[1][1]:6.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
