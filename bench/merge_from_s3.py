"""Merges streamed straight from S3 (the registry's range sources) against the same merges read
from local files and against the S3 floor, side by side in one run.

    python -m bench.merge_from_s3 [--sizes 270m,100m] [--methods ties,task_arithmetic]
                                  [--repeats 3] [--finetunes 4] [--input-shard-size 256MB]
                                  [--store-compression off|zipnn] [--floor-part 32MiB]
                                  [--floor-workers 4] [--work DIR] [--keep]

Writes a bf16 Llama-shaped base + fine-tunes per size (``bench._synth``, as ``bench.merge_engine``),
registers them in a registry (SQLite) whose store is a bucket on a ``moto_server`` this program
starts, then, ``--repeats`` times, runs as its own child process: the S3 floor (``bench._s3_floor``:
every stored input byte GET once from the same endpoint, ranged GETs on parallel threads), and
every merge from the local folders (``SafetensorsFile`` preads) and from S3
(``checkpoint_tensor_source``: row reads by HTTP Range, located by the tensor index stored at
``complete``, with the engine's prefetch), local/S3 order alternating. Printed per method and size,
medians of the runs (``bench._s3_report``): local, S3 and floor seconds; S3 / max(floor, local)
(goal <= 1.2: reads and merge overlapped); against download-then-merge (floor + local; goal < 1);
peak RSS of each child (``wait4``; goal: S3 within 1.3x of local, flat across sizes); bytes on the
wire against the input files (goal <= 1.05x, ties included) and against what the engine asked for;
HTTP requests; whether every output is byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._common import (
    MIB,
    ServerProcess,
    free_port,
    load_average,
    print_table,
    start_moto,
    start_server,
)
from bench._s3_floor import count_wire, download_checkpoints, fetch_all, stored_objects
from bench._s3_report import HEADERS, NOTES, Merge, floor_line, row, runs_line
from bench._synth import SHAPES, write_family
from bench.merge_engine import folder_bytes, measure
from mergeops.io.writer import parse_size

WEIGHTS = (1.0, 0.8, 0.6, 0.4)
DEFAULT_WORK = Path("bench/out/merge_from_s3")
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class Registry:
    """Where the S3 side reads from: the database, the bucket and the endpoint."""

    database_url: str
    store_url: str
    endpoint: str
    ids: list[int]


def _model_params(method: str, count: int, density: float) -> list[dict[str, float]]:
    params: list[dict[str, float]] = [{"weight": w} for w in WEIGHTS[:count]]
    if method == "ties":
        params = [p | {"density": density} for p in params]
    return params


def register(work: Path, folders: list[Path], endpoint: str, compression: str = "off") -> Registry:
    """A fresh bucket and registry database holding ``folders`` (base first) as checkpoints."""
    import boto3
    from sqlmodel import Session

    from registry.db import make_engine, upgrade_database
    from registry.models import CheckpointCreate, CheckpointKind
    from registry.services.completion import register_directory
    from registry.settings import Settings
    from registry.storage import open_store

    bucket = f"bench-{int(time.time() * 1000) % 10**9}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    database = work / "registry.db"
    database.unlink(missing_ok=True)
    settings = Settings(
        home=work / "home", database_url=f"sqlite:///{database}", store_url=f"s3://{bucket}/ckreg",
        s3_endpoint_url=endpoint, task_vectors_on_complete=False,
        store_compression=compression,
    )  # fmt: skip
    upgrade_database(settings.database_url)
    store = open_store(settings.store_url, endpoint_url=endpoint)
    engine, ids = make_engine(settings.database_url), []
    for folder in folders:
        kind = CheckpointKind.base if not ids else CheckpointKind.finetune
        data = CheckpointCreate(name=folder.name, kind=kind, base_id=ids[0] if ids else None)
        with Session(engine, expire_on_commit=False) as session:
            checkpoint = register_directory(
                session=session, store=store, settings=settings, data=data, directory=folder
            )
        ids.append(checkpoint.id or 0)
    engine.dispose()
    return Registry(settings.database_url, settings.store_url, endpoint, ids)


def _s3_sources(spec: dict[str, Any]) -> tuple[list[Any], Any, Any]:
    """The registry's range sources of every input, and a counter of what crossed the wire."""
    from sqlmodel import Session

    from registry.db import make_engine
    from registry.services.tensors import checkpoint_tensor_source
    from registry.storage import open_store

    store = open_store(spec["store_url"], endpoint_url=spec["endpoint"])
    wire = count_wire(store)
    engine = make_engine(spec["database_url"])
    with Session(engine) as session:
        sources = [
            checkpoint_tensor_source(session=session, store=store, checkpoint_id=i)
            for i in spec["ids"]
        ]
    engine.dispose()
    return sources[1:], sources[0], wire


def child(spec_path: Path) -> int:
    """Run one merge described by the JSON at ``spec_path``; write its report next to it."""
    import mergeops

    spec = json.loads(spec_path.read_text())
    if spec["mode"] == "floor":
        return _floor_child(spec, spec_path)
    if spec["mode"] in ("s3", "download"):  # imported before the clock, like mergeops itself
        import registry.services.tensors
        import registry.storage.s3  # noqa: F401  (boto3: 0.2 s, imported on first use)
    start = time.perf_counter()
    wire: dict[str, int] = {}
    if spec["mode"] == "s3":
        models, base, wire = _s3_sources(spec)
    elif spec["mode"] == "download":
        base, *models = _download(spec)
    else:
        models, base = spec["folders"][1:], spec["folders"][0]
    result = mergeops.merge_files(
        spec["method"], models, base=base, model_names=spec["names"],
        model_params=spec["model_params"], dtype="float32", out_dir=spec["out"],
        max_shard_size="256MB", progress=False, device="cpu",
    )  # fmt: skip
    merge_s = time.perf_counter() - start
    fetched = [getattr(s, "stats", None) for s in [*models, base]]
    report = {
        "merge_s": merge_s,
        "engine_bytes": result.bytes_read,
        "fetched": sum(s.bytes for s in fetched if s is not None),
        "requests": sum(s.requests for s in fetched if s is not None),
        "wire": wire,
        "digest": _digest(Path(spec["out"])),
    }
    spec_path.with_suffix(".report.json").write_text(json.dumps(report))
    return 0


def _download(spec: dict[str, Any]) -> list[str]:
    """Download-then-merge's download: every input checkpoint's files from the store into
    fresh local folders (the floor's GETs, each range written at its offset), base first."""
    from registry.storage import open_store

    store = open_store(spec["store_url"], endpoint_url=spec["endpoint"])
    dest = Path(spec["out"]).with_name(Path(spec["out"]).name + "-inputs")
    shutil.rmtree(dest, ignore_errors=True)
    # named as the local folders: the merge records its inputs' names in the output
    folders = [dest / Path(folder).name for folder in spec["folders"]]
    download_checkpoints(spec["database_url"], store, dict(zip(spec["ids"], folders, strict=True)),
                         part=spec["floor_part"], workers=spec["floor_workers"])  # fmt: skip
    return [str(folder) for folder in folders]


def _floor_child(spec: dict[str, Any], spec_path: Path) -> int:
    """The S3 floor in a child like the merges: every stored input byte GET once, timed."""
    from registry.storage import open_store

    store = open_store(spec["store_url"], endpoint_url=spec["endpoint"])
    objects = stored_objects(spec["database_url"], store, spec["ids"])
    wire = count_wire(store)  # after the size lookups: the timed GETs only
    seconds = fetch_all(store, objects, part=spec["floor_part"], workers=spec["floor_workers"])
    report = {"merge_s": seconds, "engine_bytes": sum(objects.values()),
              "fetched": wire["bytes"], "requests": wire["GetObject"], "wire": wire,
              "digest": ""}  # fmt: skip
    spec_path.with_suffix(".report.json").write_text(json.dumps(report))
    return 0


def _digest(folder: Path) -> str:
    """One sha256 over every output file (name and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_merge(work: Path, mode: str, method: str, spec: dict[str, Any], repeat: int = 0) -> Merge:
    """One merge (or the S3 floor, ``mode`` "floor") in a child process (peak RSS is that
    process's own)."""
    out = work / f"out-{method}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    spec_path = work / f"{method}-{mode}.json"
    spec_path.write_text(json.dumps(spec | {"mode": mode, "method": method, "out": str(out)}))
    report_path = spec_path.with_suffix(".report.json")
    report_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.merge_from_s3", "--child", str(spec_path)]
    run = measure(cmd, engine=mode, device="cpu", log=work / f"{method}-{mode}-{repeat}.log")
    report = json.loads(report_path.read_text()) if run.ok and report_path.is_file() else {}
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + "-inputs"), ignore_errors=True)  # download's
    return Merge(run, report)


def bench_size(size: str, args: argparse.Namespace, endpoint: str) -> list[list[object]]:
    """Generate, register, then ``args.repeats`` times: the S3 floor, and per method a local and
    an S3 merge (their order alternating); returns the table rows (medians)."""
    work: Path = args.work / size
    start = time.perf_counter()
    folders = write_family(work / "models", shape=SHAPES[size], finetunes=args.finetunes,
                           shard_size=args.input_shard_size)  # fmt: skip
    generated = time.perf_counter() - start
    registry = register(work, folders, endpoint, args.store_compression)
    print(f"{size}: {SHAPES[size].parameters / 1e6:.1f}M params x {len(folders)} bf16 models, "
          f"{generated:.0f} s to generate, {time.perf_counter() - start - generated:.0f} s to "
          f"register on S3; {load_average()}", flush=True)  # fmt: skip
    base_spec = {
        "folders": [str(f) for f in folders], "names": [f.name for f in folders[1:]],
        "database_url": registry.database_url, "store_url": registry.store_url,
        "endpoint": endpoint, "ids": registry.ids, "floor_part": args.floor_part,
        "floor_workers": args.floor_workers,
    }  # fmt: skip
    floors: list[Merge] = []
    modes = ("local", "s3", "download")
    merges: dict[str, dict[str, list[Merge]]] = {m: {k: [] for k in modes} for m in args.methods}
    for repeat in range(args.repeats):
        floors.append(run_merge(work, "floor", "all", base_spec, repeat))
        for method in args.methods:
            params = _model_params(method, len(folders) - 1, args.density)
            spec = base_spec | {"model_params": params}
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                merges[method][mode].append(run_merge(work, mode, method, spec, repeat))
    print(floor_line(size, floors, args.floor_part, args.floor_workers), flush=True)
    input_bytes = sum(folder_bytes(f) for f in folders)
    rows = [row(size, m, merges[m], floors, input_bytes) for m in args.methods]
    for method in args.methods:
        print(runs_line(size, method, merges[method]))
    if not args.keep:
        shutil.rmtree(work / "models", ignore_errors=True)
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.merge_from_s3", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sizes", default="270m,100m", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--methods", default="ties,task_arithmetic", help="comma list of methods")
    parser.add_argument("--finetunes", type=int, default=4, help="fine-tunes merged (1-4)")
    parser.add_argument("--density", type=float, default=0.5, help="TIES density")
    parser.add_argument("--input-shard-size", default="256MB", help="shard size of the inputs")
    parser.add_argument("--moto", choices=["ranged", "stock"], default="ranged",
                        help="ranged: moto answering a Range GET by reading only that range, as S3 "
                        "does (bench._moto_ranges); stock: moto's own GET, which reads the whole "
                        "object for every range (both with bench.moto_server's thread-safety "
                        "fixes)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of the floor and of each merge (local/S3 order alternating), "
                             "medians shown; default 3, 1 when every size is 'tiny'")  # fmt: skip
    parser.add_argument("--store-compression", choices=["off", "zipnn"], default="off",
                        help="how the registry stores the inputs: off (raw safetensors, the "
                             "default here) or zipnn (the registry's own default; the S3 side "
                             "then decodes)")  # fmt: skip
    parser.add_argument(
        "--floor-part",
        type=parse_size,
        default=32 * MIB,
        help="S3 floor: bytes per ranged GET (default 32MiB, the fastest of 1/8/32/64 MiB "
        "on the ranged moto)",
    )
    parser.add_argument(
        "--floor-workers",
        type=int,
        default=4,
        help="S3 floor: GETs in flight (default 4, the engine's read threads)",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        tiny = {s.strip() for s in args.sizes.split(",") if s.strip()} == {"tiny"}
        args.repeats = 1 if tiny else 3
    if args.repeats < 1 or args.floor_workers < 1:
        parser.error("--repeats and --floor-workers must be at least 1")
    if not 1 <= args.finetunes <= len(WEIGHTS):
        parser.error(f"--finetunes must be 1-{len(WEIGHTS)}, got {args.finetunes}")
    unknown = [s for s in args.sizes.split(",") if s.strip() and s.strip() not in SHAPES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; available: {', '.join(SHAPES)}")
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def _moto(kind: str, work: Path) -> ServerProcess:
    if kind == "stock":
        return start_moto(work)
    port = free_port()
    command = [sys.executable, "-m", "bench._moto_ranges", "-H", "127.0.0.1", "-p", str(port)]
    return start_server(command, port=port, log_path=work / "moto.log")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table; returns 1 when a merge failed."""
    args = _parse(argv)
    if args.child is not None:
        return child(args.child)
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"before: {load_average()}; {args.moto} moto_server on loopback, inputs sharded at "
          f"{args.input_shard_size}, store compression {args.store_compression}, fp32 output, "
          f"CPU, {args.repeats} run(s)", flush=True)  # fmt: skip
    rows: list[list[object]] = []
    with _moto(args.moto, args.work) as moto:
        for size in args.sizes:
            rows.extend(bench_size(size, args, moto.url))
    print_table("S3-streamed merge vs local files (merge wall excludes interpreter start)",
                HEADERS, rows)  # fmt: skip
    print(f"{NOTES}\nafter: {load_average()}")
    return 0 if all(row[-1] == "yes" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
