"""Merges streamed straight from S3 (the registry's range sources) against the same merges read
from local files, side by side in one run.

    python -m bench.merge_from_s3 [--sizes 270m,100m] [--methods ties,task_arithmetic]
                                  [--finetunes 4] [--input-shard-size 256MB] [--work DIR] [--keep]

Writes a bf16 Llama-shaped base + fine-tunes per size (``bench._synth``, as ``bench.merge_engine``),
registers them in a registry (SQLite) whose store is a bucket on a ``moto_server`` this program
starts, then runs every merge as its own child process twice: from the local folders
(``SafetensorsFile`` preads) and from S3 (``checkpoint_tensor_source``: row reads by HTTP Range,
located by the tensor index stored at ``complete``, with the engine's prefetch). Printed per merge:
merge wall time and the S3/local speed ratio (goal >= 0.7), peak RSS of each child (``wait4``;
goal: S3 within 1.3x of local, flat across sizes), bytes fetched from S3 as the sources count them
and as botocore saw them on the wire, against the input files' bytes (goal <= 1.05x) and against
what the engine asked for, HTTP requests, and whether both outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import threading
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
from bench._synth import SHAPES, write_family
from bench.merge_engine import Run, folder_bytes, measure

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


@dataclass
class Merge:
    """One child merge: the process figures and what the child reported."""

    run: Run
    report: dict[str, Any]


def _model_params(method: str, count: int, density: float) -> list[dict[str, float]]:
    params: list[dict[str, float]] = [{"weight": w} for w in WEIGHTS[:count]]
    if method == "ties":
        params = [p | {"density": density} for p in params]
    return params


def register(work: Path, folders: list[Path], endpoint: str) -> Registry:
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
    wire = {"GetObject": 0, "HeadObject": 0, "other": 0, "bytes": 0}
    lock = threading.Lock()  # the engine's prefetch threads make requests concurrently

    def before(model: Any, **_: Any) -> None:
        with lock:
            wire[model.name if model.name in wire else "other"] += 1

    def after(parsed: dict[str, Any], **_: Any) -> None:
        with lock:
            wire["bytes"] += int(parsed.get("ContentLength", 0))

    store.client.meta.events.register("before-call.s3", before)  # type: ignore[attr-defined]
    store.client.meta.events.register("after-call.s3.GetObject", after)  # type: ignore[attr-defined]
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
    if spec["mode"] == "s3":  # imported before the clock starts, like mergeops itself
        import registry.services.tensors  # noqa: F401
    start = time.perf_counter()
    wire: dict[str, int] = {}
    if spec["mode"] == "s3":
        models, base, wire = _s3_sources(spec)
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


def _digest(folder: Path) -> str:
    """One sha256 over every output file (name and bytes, in name order)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_merge(work: Path, mode: str, method: str, spec: dict[str, Any]) -> Merge:
    """One merge in a child process (peak RSS is that process's own)."""
    out = work / f"out-{method}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    spec_path = work / f"{method}-{mode}.json"
    spec_path.write_text(json.dumps(spec | {"mode": mode, "method": method, "out": str(out)}))
    report_path = spec_path.with_suffix(".report.json")
    report_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.merge_from_s3", "--child", str(spec_path)]
    run = measure(cmd, engine=mode, device="cpu", log=work / f"{method}-{mode}.log")
    report = json.loads(report_path.read_text()) if run.ok and report_path.is_file() else {}
    shutil.rmtree(out, ignore_errors=True)
    return Merge(run, report)


def bench_size(size: str, args: argparse.Namespace, endpoint: str) -> list[list[object]]:
    """Generate, register and merge one size; returns its table rows."""
    work: Path = args.work / size
    start = time.perf_counter()
    folders = write_family(work / "models", shape=SHAPES[size], finetunes=args.finetunes,
                           shard_size=args.input_shard_size)  # fmt: skip
    generated = time.perf_counter() - start
    registry = register(work, folders, endpoint)
    print(f"{size}: {SHAPES[size].parameters / 1e6:.1f}M params x {len(folders)} bf16 models, "
          f"{generated:.0f} s to generate, {time.perf_counter() - start - generated:.0f} s to "
          f"register on S3; {load_average()}", flush=True)  # fmt: skip
    input_bytes = sum(folder_bytes(f) for f in folders)
    rows = []
    for method in args.methods:
        spec = {
            "folders": [str(f) for f in folders], "names": [f.name for f in folders[1:]],
            "model_params": _model_params(method, len(folders) - 1, args.density),
            "database_url": registry.database_url, "store_url": registry.store_url,
            "endpoint": endpoint, "ids": registry.ids,
        }  # fmt: skip
        local = run_merge(work, "local", method, spec)
        remote = run_merge(work, "s3", method, spec)
        rows.append(_row(size, method, local, remote, input_bytes))
    if not args.keep:
        shutil.rmtree(work / "models", ignore_errors=True)
    return rows


def _row(size: str, method: str, local: Merge, remote: Merge, input_bytes: int) -> list[object]:
    if not (local.report and remote.report):
        failed = local if not local.report else remote
        return [size, method, f"FAILED, see {failed.run.log}", *["-"] * 11]
    lw, sw = local.report["merge_s"], remote.report["merge_s"]
    fetched, wire = remote.report["fetched"], remote.report["wire"]
    return [
        size, method, lw, sw, lw / sw,
        f"{local.run.peak_rss / MIB:.0f}", f"{remote.run.peak_rss / MIB:.0f}",
        remote.run.peak_rss / local.run.peak_rss,
        f"{input_bytes / MIB:.0f}", f"{fetched / MIB:.0f}", fetched / input_bytes,
        fetched / remote.report["engine_bytes"],
        f"{wire['GetObject']}/{wire['HeadObject']}",
        "yes" if local.report["digest"] == remote.report["digest"] else "NO",
    ]  # fmt: skip


HEADERS = ["size", "method", "local s", "s3 s", "speed s3/local", "local RSS MiB",
           "s3 RSS MiB", "RSS s3/local", "input MiB", "fetched MiB", "fetched/input",
           "fetched/asked", "GET/HEAD", "identical"]  # fmt: skip


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
                        "does (bench._moto_ranges); stock: moto as shipped, which reads the whole "
                        "object for every range")  # fmt: skip
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
          f"{args.input_shard_size}, fp32 output, CPU", flush=True)  # fmt: skip
    rows: list[list[object]] = []
    with _moto(args.moto, args.work) as moto:
        for size in args.sizes:
            rows.extend(bench_size(size, args, moto.url))
    print_table("S3-streamed merge vs local files (merge wall excludes interpreter start)",
                HEADERS, rows)  # fmt: skip
    print("speed s3/local = local s / s3 s (goal >= 0.70); RSS = child ru_maxrss (goal s3/local "
          "<= 1.30, flat across sizes); fetched = bytes the S3 sources read (goal <= 1.05x the "
          "input files); fetched/asked = against the bytes the engine asked for; GET/HEAD = S3 "
          f"requests on the wire.\nafter: {load_average()}")  # fmt: skip
    return 0 if all(row[-1] == "yes" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
