"""Merge-engine benchmark: ckreg (mergeops) against mergekit on the same synthetic checkpoints.

    python -m bench.merge_engine [--sizes 270m,100m] [--methods ties,task_arithmetic,linear|mergekit]
                                 [--mergekit PATH|none] [--work DIR] [--keep] [--prefetch-compare]
                                 [--engines ckreg[,mergekit]] [--ckreg-only ties@3b]
                                 [--method-repeats ties@3b=1] [--shard-sizes 256MB,5GB]
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
alternating order) and the median run is shown. Every timed run — floor, ckreg, mergekit —
starts from the same state: the inputs read once untimed (when they fit in half the RAM) and
``os.sync()``.

At the end a markdown summary (``bench.merge_report``): per method and size the floor, ckreg
and mergekit seconds, ckreg/floor, mergekit/ckreg, ckreg seconds per GB of input and both peak
RSS, then issue 20's goals met or not, and with ``--shard-sizes`` ckreg's peak RSS at each
output shard size. Sizes run one after another: generate, measure, delete (unless ``--keep``),
so 3b needs about 42 GB free (5 x 6 GB inputs + a 12 GB float32 output; the parity check with
mergekit needs a second output and is skipped when it does not fit). ``--engines``,
``--ckreg-only`` and ``--method-repeats`` (``bench.merge_options``) keep long mergekit runs out.

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
import sys
import time
from pathlib import Path

import torch
import yaml

from bench._common import MIB
from bench._measure import folder_bytes, measure
from bench._synth import SHAPES, write_family
from bench.merge_floor import Floor, format_floor, measure_floor, median_floor, warm_inputs
from bench.merge_options import (
    add_options,
    check_room,
    finish,
    free_bytes,
    repeats_for,
    runs_mergekit,
)
from bench.merge_parity import Parity, compare
from bench.merge_pipeline import cuda_main, h2d_bandwidth, prefetch_compare
from bench.merge_report import Row, Run, format_table, print_notes, print_summary
from bench.merge_setups import CKREG_VARIANTS, mergekit_methods, setup_of

WEIGHTS = (1.0, 0.8, 0.6, 0.4)
DEFAULT_WORK = Path("bench/out/merge_engine")
MERGEKIT_FLAGS = ("--no-copy-tokenizer", "--quiet")
"""Defaults otherwise (CPU, no lazy-unpickle, sync writes); the synthetic models have no
tokenizer, so copying one would fail."""


def write_config(path: Path, method: str, folders: list[Path], density: float) -> Path:
    """The mergekit YAML both engines run (fp32 compute and output, for parity)."""
    setup = setup_of(method)
    merge_method, extra = CKREG_VARIANTS.get(method, (method, {}))
    base, finetunes = folders[0], folders[1 : 1 + setup.models]
    models = []
    for folder, weight in zip(finetunes, WEIGHTS, strict=False):
        entry: dict[str, object] = {"model": str(folder.resolve())}
        if setup.per_model is not None:
            params = {k: density if v == -1 else v for k, v in setup.per_model.items()}
            entry["parameters"] = {"weight": weight, **params}
        models.append(entry)
    config: dict[str, object] = {"merge_method": merge_method, "models": models,
                                 "dtype": "float32"}  # fmt: skip
    if setup.base:
        config["base_model"] = str(base.resolve())
    if setup.shared or extra:
        config["parameters"] = {**(setup.shared or {}), **extra}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ckreg_command() -> list[str]:
    """``ckreg`` next to this interpreter, else on PATH, else mergeops' CLI via ``-c``."""
    beside = Path(sys.executable).parent / "ckreg"
    found = str(beside) if beside.is_file() else shutil.which("ckreg")
    if found:
        return [found, "merge"]
    return [sys.executable, "-c", "from mergeops.cli import merge_entry; merge_entry()", "merge"]


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


def _median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (a failed run counts as the slowest)."""
    ordered = sorted(runs, key=lambda r: (not r.ok, r.wall_s))
    return ordered[(len(ordered) - 1) // 2]


def _ckreg_cmd(cfg: Path, out: Path, shard_size: str, device: str = "cpu") -> list[str]:
    return [*ckreg_command(), "--config", str(cfg), "--out", str(out), "--device", device,
            "--max-shard-size", shard_size, "--no-progress"]  # fmt: skip


def bench_method(
    size: str, method: str, folders: list[Path], args: argparse.Namespace
) -> list[Row]:
    """ckreg (CPU, and CUDA when present), mergekit and the floor on one size and method,
    repeated with the engines' order alternating; medians are reported. Each output is removed
    right after its run (both kept for the parity check of the first repeat when it fits)."""
    work: Path = args.work / size
    cfg = write_config(work / f"{method}.yml", method, folders, args.density)
    setup = setup_of(method)
    inputs = ([folders[0]] if setup.base else []) + folders[1 : 1 + setup.models]
    in_bytes = sum(folder_bytes(f) for f in inputs)
    out_bytes = 2 * folder_bytes(folders[0])  # fp32 output
    outs = {e: work / f"out-{method}-{e}" for e in ("ckreg", "mergekit", "ckreg-cuda")}
    memcpy = copy_bandwidth(in_bytes + out_bytes)
    cmds = {"ckreg": _ckreg_cmd(cfg, outs["ckreg"], args.shard_size),
            "mergekit": [str(args.mergekit), str(cfg), str(outs["mergekit"]), "--out-shard-size",
                         args.shard_size.removesuffix("B"), *MERGEKIT_FLAGS]}  # fmt: skip
    both = runs_mergekit(args, method, size) and method not in CKREG_VARIANTS
    engines = ["ckreg", "mergekit"] if both else ["ckreg"]
    parity_wanted = len(engines) == 2 and not args.no_parity
    if parity_wanted and free_bytes(work) < 2 * out_bytes + 1e9:
        print(f"{size} {method}: parity check skipped, no disk room for two outputs")
        parity_wanted = False
    parity_inputs = folders[: 1 + setup.models] if parity_wanted else None
    runs, floors, parity = _timed_runs(
        method, engines, cmds, outs, inputs, out_bytes, parity_inputs, args, work
    )
    floor = median_floor(floors).seconds
    ck = _median_run(runs["ckreg"])
    rows = [Row(size, method, ck, in_bytes + out_bytes, memcpy, parity, floor=floor,
                in_bytes=in_bytes)]  # fmt: skip
    rows[0].shard_rss = _shard_rss(cfg, outs["ckreg"], work, method, ck, args)
    if runs["mergekit"]:
        mk = _median_run(runs["mergekit"])
        rows.append(Row(size, method, mk, in_bytes + out_bytes, memcpy, floor=floor,
                        in_bytes=in_bytes))  # fmt: skip
        rows[0].versus = mk
    if torch.cuda.is_available():
        gpu = measure(_ckreg_cmd(cfg, outs["ckreg-cuda"], args.shard_size, "cuda"),
                      engine="ckreg", device="cuda", log=work / f"{method}-ckreg-cuda.log")  # fmt: skip
        rows.append(Row(size, method, gpu, in_bytes + folder_bytes(outs["ckreg-cuda"]), memcpy))
        shutil.rmtree(outs["ckreg-cuda"], ignore_errors=True)
    if args.prefetch_compare:
        rows[0].prefetch = prefetch_compare(cfg, work, method, measure)
    return rows


def _timed_runs(
    method: str,
    engines: list[str],
    cmds: dict[str, list[str]],
    outs: dict[str, Path],
    inputs: list[Path],
    out_bytes: int,
    parity_inputs: list[Path] | None,
    args: argparse.Namespace,
    work: Path,
) -> tuple[dict[str, list[Run]], list[Floor], Parity | None]:
    """The floor and each engine per repeat (order alternating); the outputs of the first
    repeat are compared when ``parity_inputs`` (base first) is given."""
    runs: dict[str, list[Run]] = {"ckreg": [], "mergekit": []}
    floors: list[Floor] = []
    parity = None
    for repeat in range(repeats_for(args, method, work.name)):
        _settle(inputs)
        floors.append(measure_floor(inputs, out_bytes, work / "floor.bin"))
        keep = repeat == 0 and parity_inputs is not None
        for engine in engines if repeat % 2 == 0 else engines[::-1]:
            log = work / f"{method}-{'ckreg' if engine == 'ckreg' else 'mk'}-{repeat}.log"
            _settle(inputs)
            runs[engine].append(measure(cmds[engine], engine=engine, device="cpu", log=log))
            if not keep:
                shutil.rmtree(outs[engine], ignore_errors=True)
        if keep and runs["ckreg"][0].ok and runs["mergekit"][0].ok:
            parity = compare(outs["ckreg"], outs["mergekit"], density=args.density,
                             ties_inputs=parity_inputs if method == "ties" else None)  # fmt: skip
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return runs, floors, parity


def _settle(inputs: list[Path]) -> None:
    """Before each timed run: the inputs in the page cache (when they fit) and no write-back
    pending from the run before, so the floor and both engines start from the same state."""
    warm_inputs(inputs)
    os.sync()


def _shard_rss(
    cfg: Path, out: Path, work: Path, method: str, main: Run, args: argparse.Namespace
) -> dict[str, int]:
    """ckreg's peak RSS at every ``--shard-sizes`` entry (one run each; the main shard size's
    figure is the median run's); a failed run counts 0."""
    found = {}
    for shard in args.shard_sizes:
        if shard == args.shard_size:
            found[shard] = main.peak_rss if main.ok else 0
            continue
        log = work / f"{method}-ckreg-shard-{shard}.log"
        run = measure(_ckreg_cmd(cfg, out, shard), engine="ckreg", device="cpu", log=log)
        shutil.rmtree(out, ignore_errors=True)
        found[shard] = run.peak_rss if run.ok else 0
    return found


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
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="scratch folder for inputs and outputs (3b: ~42 GB free)")  # fmt: skip
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
    add_options(parser)
    args = parser.parse_args(argv)
    unknown = [x for x in args.sizes.split(",") if x.strip() and x.strip() not in SHAPES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; available: {', '.join(SHAPES)}")
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
    finish(args, parser)
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
        print("mergekit: skipped (--engines ckreg, --mergekit none, or no mergekit-yaml on PATH: "
              "pip install 'ckreg[bench]' or pass --mergekit)")  # fmt: skip
    rows: list[Row] = []
    for size in sizes:
        shape = SHAPES[size]
        models = args.work / size / "models"
        need = 5 * shape.file_bytes() - _bytes_under(models) + 2 * shape.file_bytes()
        problem = check_room(args.work, size, need)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        start = time.perf_counter()
        folders = write_family(models, shape=shape)
        os.sync()  # no write-back of the generated inputs during the timed runs
        print(f"{size}: {shape.parameters / 1e6:.0f}M params x 5 bf16 models "
              f"({time.perf_counter() - start:.0f} s to generate), load {os.getloadavg()[0]:.1f}",
              flush=True)  # fmt: skip
        if args.floor:
            scratch = args.work / size / "floor.bin"
            out_bytes = 2 * folder_bytes(folders[0])
            floors = []
            for _ in range(args.repeats):
                _settle(folders)
                floors.append(measure_floor(folders, out_bytes, scratch))
            print(format_floor(size, floors))
        for method in (
            [] if args.floor else [m.strip() for m in args.methods.split(",") if m.strip()]
        ):
            rows.extend(bench_method(size, method, folders, args))
        if not args.keep:
            shutil.rmtree(models)
    if args.floor:
        return 0
    print(format_table(rows))
    repeats = f"{args.repeats}" + (
        f" (overrides {args.method_repeats})" if args.method_repeats else ""
    )
    print_notes(rows, repeats, h2d_bandwidth() if torch.cuda.is_available() else None)
    startup = measure([sys.executable, "-c", STARTUP], engine="python", device="cpu",
                      log=args.work / "startup.log")  # fmt: skip
    print_summary(rows, startup.wall_s)
    return 0 if all(r.run.ok for r in rows) else 1


STARTUP = "import gc, torch, mergeops; gc.freeze()"
"""Process start-up and exit as ``ckreg merge`` pays them (it freezes objects before exit)."""


def _bytes_under(folder: Path) -> int:
    """Bytes of the files already in ``folder`` (a kept family is not written again)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


if __name__ == "__main__":
    raise SystemExit(main())
