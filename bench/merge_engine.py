"""Merge-engine benchmark: ckreg (mergeops) against mergekit on the same synthetic checkpoints.

    python -m bench.merge_engine [--sizes 270m,100m] [--methods ties,task_arithmetic,linear|mergekit]
                                 [--mergekit PATH|none] [--work DIR] [--keep] [--prefetch-compare]
    python -m bench.merge_engine --floor [--sizes 100m] [--repeats 3]
    python -m bench.merge_engine --device cuda [--sizes 270m]
                                 [--methods ties,task_arithmetic,ota_ffg,opcm]

Writes a bf16 Llama-shaped base + 4 fine-tunes per size (``bench._synth``), then runs every
merge as its own subprocess (``ckreg merge`` and ``mergekit-yaml`` on the same YAML) and prints
wall time, peak RSS (``wait4`` rusage of that process; RssAnon sampled from /proc), the max
difference between the two outputs, and effective bandwidth (input + output bytes per second)
next to a plain in-RAM tensor copy of the same bytes timed just before. With CUDA it adds
ckreg ``--device cuda`` rows and their ratio to pinned host-to-device bandwidth. The output
comparison lives in ``bench.merge_parity``. ``--prefetch-compare`` adds, per method, the
in-process merge time with input prefetch off and on.

Every CPU row has the floor of the same files in the same run (``bench.merge_floor``: read
each input once, write one output of the output's size) and the time as a multiple of it;
``--floor`` prints only the floor. Each method runs ``--repeats`` times (ckreg and mergekit in
alternating order, after ``os.sync()`` of the generated inputs) and the median run is shown.

``--methods mergekit`` gives a row per registered method that mergekit 0.1.5 also has (its
parameters in ``MERGEKIT_SETUPS``), both engines on the same files in one run.

``--device cuda`` runs only ckreg on the GPU (bf16 in and out; ota_ffg with synthetic second
moments, opcm from a fresh state) and prints wall time, effective bandwidth, the pinned
host-to-device bandwidth measured in the same run and their ratio (``bench.merge_pipeline``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from bench._common import MIB
from bench._synth import SHAPES, write_family
from bench.merge_floor import Floor, format_floor, measure_floor, median_floor
from bench.merge_parity import Parity, compare, format_parity
from bench.merge_pipeline import cuda_main, h2d_bandwidth, prefetch_compare
from bench.merge_setups import MERGEKIT_SETUPS, Setup, mergekit_methods

WEIGHTS = (1.0, 0.8, 0.6, 0.4)
DEFAULT_WORK = Path("bench/out/merge_engine")
MERGEKIT_FLAGS = ("--no-copy-tokenizer", "--quiet")
"""Defaults otherwise (CPU, no lazy-unpickle, sync writes); the synthetic models have no
tokenizer, so copying one would fail."""


@dataclass
class Run:
    """One merge subprocess: its wall time and memory."""

    engine: str
    device: str
    wall_s: float
    cpu_s: float
    peak_rss: int
    peak_anon: int
    ok: bool
    log: Path


# ru_maxrss survives execve, so a child exec'd straight from this (large) process would report
# our own peak; a tiny launcher forks the merge from a small process and reports its rusage.
_LAUNCHER = """import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    cpu = usage.ru_utime + usage.ru_stime
    out.write(f"{usage.ru_maxrss} {time.perf_counter() - start} {cpu}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _rss_anon(pid: int) -> int:
    """RssAnon (bytes) of ``pid``'s children, i.e. of the merge under the launcher."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return total


def measure(cmd: list[str], *, engine: str, device: str, log: Path) -> Run:
    """Run ``cmd`` to completion; peak RSS is that process's own ``ru_maxrss``."""
    peak_anon = [0]
    report = log.with_suffix(".rusage")
    with log.open("w") as sink:
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(report), *cmd]
        proc = subprocess.Popen(launcher, stdout=sink, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                peak_anon[0] = max(peak_anon[0], _rss_anon(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        returncode = proc.wait()
        done.set()
        sampler.join()
    maxrss_kib, wall, cpu = (
        report.read_text().split() if report.is_file() else ("0",) + ("nan",) * 2
    )
    return Run(engine, device, float(wall), float(cpu), int(maxrss_kib) * 1024, peak_anon[0],
               returncode == 0, log)  # fmt: skip


def write_config(path: Path, method: str, folders: list[Path], density: float) -> Path:
    """The mergekit YAML both engines run (fp32 compute and output, for parity)."""
    setup = MERGEKIT_SETUPS.get(method, Setup(per_model={}))
    base, finetunes = folders[0], folders[1 : 1 + setup.models]
    models = []
    for folder, weight in zip(finetunes, WEIGHTS, strict=False):
        entry: dict[str, object] = {"model": str(folder.resolve())}
        if setup.per_model is not None:
            params = {k: density if v == -1 else v for k, v in setup.per_model.items()}
            entry["parameters"] = {"weight": weight, **params}
        models.append(entry)
    config: dict[str, object] = {"merge_method": method, "models": models, "dtype": "float32"}
    if setup.base:
        config["base_model"] = str(base.resolve())
    if setup.shared:
        config["parameters"] = dict(setup.shared)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ckreg_command() -> list[str]:
    """``ckreg`` next to this interpreter, else on PATH, else mergeops' CLI via ``-c``."""
    beside = Path(sys.executable).parent / "ckreg"
    found = str(beside) if beside.is_file() else shutil.which("ckreg")
    if found:
        return [found, "merge"]
    return [sys.executable, "-c", "from mergeops.cli import merge_app; merge_app()", "merge"]


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files in ``folder``."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def copy_bandwidth(total_bytes: int, chunk: int = 256 * MIB) -> tuple[float, float]:
    """GB/s (read + written) moving ``total_bytes`` through RAM: ``dst.copy_(src)`` into a
    buffer already touched, and ``src.clone()`` into fresh memory (page faults included)."""
    src = torch.rand(chunk // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages once
    copies = max(1, round(total_bytes / (2 * chunk)))
    rates = []
    for copy in (lambda: dst.copy_(src), src.clone):
        start = time.perf_counter()
        for _ in range(copies):
            copy()
        rates.append(2 * chunk * copies / (time.perf_counter() - start) / 1e9)
    return rates[0], rates[1]


@dataclass
class Row:
    size: str
    method: str
    run: Run
    moved: int
    memcpy_gbs: tuple[float, float]
    parity: Parity | None = None
    versus: Run | None = None
    prefetch: tuple[float, float] | None = None
    floor: float | None = None


def _median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (a failed run counts as the slowest)."""
    ordered = sorted(runs, key=lambda r: (not r.ok, r.wall_s))
    return ordered[(len(ordered) - 1) // 2]


def bench_method(
    size: str, method: str, folders: list[Path], args: argparse.Namespace
) -> list[Row]:
    """ckreg (CPU, and CUDA when present), mergekit and the floor on one size and method,
    ``args.repeats`` times with the engines' order alternating; medians are reported."""
    work: Path = args.work / size
    cfg = write_config(work / f"{method}.yml", method, folders, args.density)
    setup = MERGEKIT_SETUPS.get(method, Setup())
    inputs = ([folders[0]] if setup.base else []) + folders[1 : 1 + setup.models]
    in_bytes = sum(folder_bytes(f) for f in inputs)
    outs = {e: work / f"out-{method}-{e}" for e in ("ckreg", "mergekit", "ckreg-cuda")}
    memcpy = copy_bandwidth(in_bytes + 2 * folder_bytes(folders[0]))  # fp32 output
    shard = ["--max-shard-size", args.shard_size, "--no-progress"]
    ck_cmd = [*ckreg_command(), "--config", str(cfg), "--out", str(outs["ckreg"]),
              "--device", "cpu", *shard]  # fmt: skip
    mk_cmd = [str(args.mergekit), str(cfg), str(outs["mergekit"]), "--out-shard-size",
              args.shard_size.removesuffix("B"), *MERGEKIT_FLAGS]  # fmt: skip
    runs: dict[str, list[Run]] = {"ckreg": [], "mergekit": []}
    floors: list[Floor] = []
    parity = None
    for repeat in range(args.repeats):
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
        floors.append(measure_floor(inputs, 2 * folder_bytes(folders[0]), work / "floor.bin"))
        order = ["ckreg", "mergekit"] if repeat % 2 == 0 else ["mergekit", "ckreg"]
        for engine in order:
            if engine == "mergekit" and not args.mergekit:
                continue
            cmd, tag = (ck_cmd, "ckreg") if engine == "ckreg" else (mk_cmd, "mk")
            log = work / f"{method}-{tag}-{repeat}.log"
            runs[engine].append(measure(cmd, engine=engine, device="cpu", log=log))
        if repeat == 0 and args.mergekit and runs["ckreg"][0].ok and runs["mergekit"][0].ok:
            ties_inputs = folders[: 1 + setup.models] if method == "ties" else None
            parity = compare(
                outs["ckreg"], outs["mergekit"], ties_inputs=ties_inputs, density=args.density
            )
    floor = median_floor(floors).seconds
    ck = _median_run(runs["ckreg"])
    out_bytes = 2 * folder_bytes(folders[0])
    rows = [Row(size, method, ck, in_bytes + out_bytes, memcpy, parity, floor=floor)]
    if runs["mergekit"]:
        mk = _median_run(runs["mergekit"])
        rows.append(Row(size, method, mk, in_bytes + out_bytes, memcpy, floor=floor))
        rows[0].versus = mk
    if torch.cuda.is_available():
        gpu = measure([*ckreg_command(), "--config", str(cfg), "--out", str(outs["ckreg-cuda"]),
                       "--device", "cuda", *shard], engine="ckreg", device="cuda",
                      log=work / f"{method}-ckreg-cuda.log")  # fmt: skip
        rows.append(Row(size, method, gpu, in_bytes + folder_bytes(outs["ckreg-cuda"]), memcpy))
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if args.prefetch_compare:
        rows[0].prefetch = prefetch_compare(cfg, work, method, measure)
    return rows


def format_table(rows: list[Row]) -> str:
    """The results table: one line per engine run."""
    head = (f"{'size':>5} {'method':<16}{'engine':<9}{'dev':<5}{'wall s':>8}{'cpu s':>7}{'peak RSS':>10}"
            f"{'RssAnon':>9}{'GB/s':>7}{'memcpy':>8}{'+alloc':>7}{'%cpy':>6}{'speedup':>8}{'RSS/mk':>7}"
            f"{'floor':>7}{'xfloor':>7}  ckreg vs mergekit output")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        gbs = r.moved / r.run.wall_s / 1e9
        speed = f"{r.versus.wall_s / r.run.wall_s:.2f}x" if r.versus and r.versus.ok else "-"
        ratio = f"{r.run.peak_rss / r.versus.peak_rss:.2f}" if r.versus and r.versus.ok else "-"
        state = "" if r.run.ok else f"  FAILED, see {r.run.log}"
        floor = (
            f"{r.floor:>7.2f}{r.run.wall_s / r.floor:>6.1f}x" if r.floor else f"{'-':>7}{'-':>7}"
        )
        lines.append(
            f"{r.size:>5} {r.method:<16}{r.run.engine:<9}{r.run.device:<5}{r.run.wall_s:>8.1f}{r.run.cpu_s:>7.1f}"
            f"{r.run.peak_rss / MIB:>7.0f}MiB{r.run.peak_anon / MIB:>6.0f}MiB{gbs:>7.2f}"
            f"{r.memcpy_gbs[0]:>8.2f}{r.memcpy_gbs[1]:>7.2f}{100 * gbs / r.memcpy_gbs[0]:>5.1f}%"
            f"{speed:>8}{ratio:>7}{floor}"
            f"  {format_parity(r.parity)}{state}"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="270m,100m", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--methods", default=None,
                        help="comma-separated, or 'mergekit' (every method mergekit also has); "
                             "default: ties,task_arithmetic,linear on CPU; "
                             "ties,task_arithmetic,ota_ffg,opcm on CUDA")  # fmt: skip
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--mergekit", default=_mergekit_yaml(),
                        help="mergekit-yaml executable, or 'none' to skip it")  # fmt: skip
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--shard-size", default="256MB", help="output shard size, both engines")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per method (engine order alternating), medians shown; "
                             "default 3, 1 when every size is 'tiny' (the smoke-test size)")  # fmt: skip
    parser.add_argument("--floor", action="store_true",
                        help="only time the floor: read the base and 4 fine-tunes once and "
                             "write one float32 output of the base's size")  # fmt: skip
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: ckreg vs mergekit; cuda: ckreg on the GPU vs H2D bandwidth",
    )
    parser.add_argument(
        "--prefetch-compare",
        action="store_true",
        help="also time each CPU merge in-process with prefetch off and on",
    )
    args = parser.parse_args(argv)
    if args.methods is None:
        cuda = args.device == "cuda"
        args.methods = (
            "ties,task_arithmetic,ota_ffg,opcm" if cuda else "ties,task_arithmetic,linear"
        )
    if args.methods == "mergekit":
        args.methods = ",".join(mergekit_methods())
    args.mergekit = None if args.mergekit in ("", "none") else args.mergekit
    if args.repeats is None:
        tiny = {s.strip() for s in args.sizes.split(",") if s.strip()} == {"tiny"}
        args.repeats = 1 if tiny else 3
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def _mergekit_yaml() -> str:
    """``mergekit-yaml`` beside this interpreter, else on PATH, else ``none``."""
    beside = Path(sys.executable).parent / "mergekit-yaml"
    return str(beside) if beside.is_file() else shutil.which("mergekit-yaml") or "none"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns 1 when a merge failed."""
    args = _parse(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if args.device == "cuda":
        return cuda_main(args, sizes, measure)
    print(f"load average (1/5/15 min): {os.getloadavg()}, cpus: {os.cpu_count()}, "
          f"torch threads: {torch.get_num_threads()}")  # fmt: skip
    print(f"ckreg: {' '.join(ckreg_command())} --device cpu --max-shard-size {args.shard_size}")
    if args.mergekit:
        print(f"mergekit: {args.mergekit} --out-shard-size {args.shard_size.removesuffix('B')} "
              f"{' '.join(MERGEKIT_FLAGS)} (CPU, other options default)")  # fmt: skip
    else:
        print("mergekit: skipped (not on PATH; pip install 'ckreg[bench]' or pass --mergekit)")
    rows: list[Row] = []
    for size in sizes:
        shape = SHAPES[size]
        start = time.perf_counter()
        folders = write_family(args.work / size / "models", shape=shape)
        os.sync()  # no write-back of the generated inputs during the timed runs
        print(f"{size}: {shape.parameters / 1e6:.0f}M params x 5 bf16 models "
              f"({time.perf_counter() - start:.0f} s to generate), load {os.getloadavg()[0]:.1f}")  # fmt: skip
        if args.floor:
            scratch = args.work / size / "floor.bin"
            out_bytes = 2 * folder_bytes(folders[0])
            floors = [measure_floor(folders, out_bytes, scratch) for _ in range(args.repeats)]
            print(format_floor(size, floors))
        for method in (
            [] if args.floor else [m.strip() for m in args.methods.split(",") if m.strip()]
        ):
            rows.extend(bench_method(size, method, folders, args))
        if not args.keep:
            shutil.rmtree(args.work / size / "models")
    if args.floor:
        return 0
    print(format_table(rows))
    _print_notes(rows, args)
    return 0 if all(r.run.ok for r in rows) else 1


def _print_notes(rows: list[Row], args: argparse.Namespace) -> None:
    print("GB/s = (input + output safetensors bytes) / wall; memcpy = torch copy_ in RAM "
          "(read + written), +alloc = the same into fresh memory (clone); cpu s = user + sys; speedup and RSS/mk: ckreg vs mergekit; rel = max|a-b| / max|b| "
          "per tensor; off-ties: ties max diff away from threshold ties")  # fmt: skip
    print(f"floor = read every input file once + write one output of the output's size "
          f"(bench.merge_floor), median of {args.repeats}; xfloor = wall / floor; "
          "wall, RSS: median run of the repeats, ckreg/mergekit order alternating")  # fmt: skip
    print(f"load average after: {os.getloadavg()}")
    for r in rows:
        if r.prefetch is not None:
            off, on = r.prefetch
            print(f"prefetch {r.size} {r.method}: merge {off:.2f} s off, {on:.2f} s on "
                  f"({off / on:.2f}x), in-process, CPU")  # fmt: skip
    cpu = [r for r in rows if r.run.engine == "ckreg" and r.run.device == "cpu"]
    by_size = {r.size: max(x.run.peak_rss for x in cpu if x.size == r.size) for r in cpu}
    if len(by_size) > 1:
        print("ckreg peak RSS by size: "
              + ", ".join(f"{s} {v / MIB:.0f}MiB" for s, v in by_size.items()))  # fmt: skip
    if torch.cuda.is_available():
        h2d = h2d_bandwidth()
        print(f"CUDA: pinned host-to-device {h2d:.1f} GB/s; ckreg cuda rows / H2D: "
              + ", ".join(f"{r.size} {r.method} {r.moved / r.run.wall_s / 1e9 / h2d:.2f}"
                          for r in rows if r.run.device == "cuda"))  # fmt: skip
    else:
        print("CUDA: not available on this machine")


if __name__ == "__main__":
    raise SystemExit(main())
