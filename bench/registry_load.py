"""Load benchmark: N concurrent clients mixing registrations and reads against one ``ckreg serve``.

``python -m bench.registry_load --clients 30 --duration 30 --s3 --workers 2 --database-url postgresql+psycopg://...``
starts ``ckreg serve`` (embedded mode, its own process, ``--workers`` API processes; with ``--s3`` an S3 store on a
``moto_server`` this program starts; SQLite in a temp dir unless ``--database-url``), then runs
``--clients`` asyncio clients (one API token each). Each client, in a loop, registers a tiny
checkpoint (create -> PUT -> complete: three requests) with probability ``--write-share``, else
reads: a page of the listing, one checkpoint, or a file download (checked against the sha256 it
was uploaded with). Phases, in one run:

1. wait until the server is idle (embedded mode imports Prefect and starts its API at start-up);
2. ``--warmup`` seconds of the mix, not reported (connection pools, first-call imports);
3. reference: ``--reference-duration`` seconds of the same clients calling ``GET /healthz``
   (answered on the event loop: no database, no store), the ceiling of this client, uvicorn and
   machine, printed side by side with the mix;
4. ``--duration`` seconds of the mix, measured;
5. every ready checkpoint's file downloaded and verified.

Reported: requests/s, count / errors / p50 / p95 / p99 (ms) per operation, CPU seconds per
component (registry, moto, PostgreSQL backends, this load generator, the rest of the machine)
and the load average before and after. Goal (issue 18, 2-core machine): >= 100 requests/s with
30 clients, p95 of reads < 250 ms, 0 errors, 0 mismatches.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import random
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    S3_ENV,
    ServerProcess,
    free_port,
    load_average,
    start_moto,
    start_server,
)
from bench._load_client import Client, Reply
from bench._load_report import report_run, wait_until_idle
from bench._procstat import CpuMeter

READS = ("list", "show", "download")


@dataclass
class Stats:
    """Latencies (s) and error messages per operation; what each ready checkpoint should hold."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    uploaded: dict[int, str] = field(default_factory=dict)  # checkpoint id -> sha256 of its file
    ready: list[int] = field(default_factory=list)  # the same ids, to pick from
    mismatches: list[str] = field(default_factory=list)
    seeds: Iterator[int] = field(default_factory=itertools.count)  # unique checkpoint names

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + sum(
            len(v) for v in self.errors.values()
        )

    def next_phase(self) -> Stats:
        """Fresh latencies and errors; the same checkpoints, seeds and mismatches."""
        return Stats(
            uploaded=self.uploaded, ready=self.ready, mismatches=self.mismatches, seeds=self.seeds
        )


def tiny_file(seed: int) -> bytes:
    """A ~1 KiB safetensors file, different per seed."""
    import torch
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    return save({"w": torch.randn(16, 16, generator=gen), "b": torch.randn(16, generator=gen)})


async def _timed(stats: Stats, op: str, call: Any, expect: int) -> Reply | None:
    start = time.perf_counter()
    try:
        reply = await call
    except Exception as exc:  # a refused or dropped connection is an error of this operation
        stats.errors[op].append(f"{type(exc).__name__}: {exc}")
        return None
    stats.latencies[op].append(time.perf_counter() - start)
    if reply.status_code != expect:
        stats.latencies[op].pop()
        stats.errors[op].append(f"{reply.status_code}: {reply.content[:200]!r}")
        return None
    return reply


async def register(client: Client, stats: Stats, seed: int) -> None:
    data = tiny_file(seed)
    body = {"name": f"load-{seed}", "kind": "base"}
    created = await _timed(
        stats, "create", client.request("POST", "/api/v1/checkpoints", json=body), 201
    )
    if created is None:
        return
    checkpoint_id = created.json()["id"]
    url = f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"
    if await _timed(stats, "put", client.request("PUT", url, data=data), 200) is None:
        return
    done = client.request("POST", f"/api/v1/checkpoints/{checkpoint_id}/complete", json={})
    if await _timed(stats, "complete", done, 200) is not None:
        stats.uploaded[checkpoint_id] = hashlib.sha256(data).hexdigest()
        stats.ready.append(checkpoint_id)


async def read(client: Client, stats: Stats, rng: random.Random) -> None:
    op = rng.choice(READS)
    if op == "list" or not stats.ready:
        offset = rng.randrange(0, max(1, len(stats.ready)))
        listing = client.request("GET", f"/api/v1/checkpoints?limit=20&offset={offset}")
        await _timed(stats, "list", listing, 200)
        return
    checkpoint_id = rng.choice(stats.ready)
    if op == "show":
        shown = client.request("GET", f"/api/v1/checkpoints/{checkpoint_id}")
        await _timed(stats, "show", shown, 200)
        return
    url = f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"
    reply = await _timed(stats, "download", client.request("GET", url), 200)
    if (
        reply is not None
        and hashlib.sha256(reply.content).hexdigest() != stats.uploaded[checkpoint_id]
    ):
        stats.mismatches.append(f"checkpoint {checkpoint_id} (during the run)")


async def run_clients(
    url: str, tokens: list[str], args: argparse.Namespace, stats: Stats, *, phase: str
) -> float:
    """Run the clients (one token each, as separate users would have) for the phase's seconds:
    the mix, or only ``GET /healthz`` in the reference phase. Returns the elapsed seconds."""
    seconds = {"warmup": args.warmup, "reference": args.reference_duration}.get(
        phase, args.duration
    )
    deadline = time.monotonic() + seconds

    async def one(index: int) -> None:
        rng = random.Random(f"{args.seed}-{phase}-{index}")
        async with Client(url, tokens[index], args.client) as client:
            while time.monotonic() < deadline:
                if phase == "reference":
                    await _timed(stats, "healthz", client.request("GET", "/healthz"), 200)
                elif rng.random() < args.write_share:
                    await register(client, stats, next(stats.seeds))
                else:
                    await read(client, stats, rng)

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.clients)))
    return time.monotonic() - start


def verify_all(url: str, token: str, stats: Stats) -> int:
    """Download every registered checkpoint's file and compare sha256; returns how many."""
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        for checkpoint_id, digest in stats.uploaded.items():
            shown = client.get(f"/api/v1/checkpoints/{checkpoint_id}").json()
            got = client.get(f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors")
            if shown.get("status") != "ready" or hashlib.sha256(got.content).hexdigest() != digest:
                stats.mismatches.append(f"checkpoint {checkpoint_id} (after the run)")
    return len(stats.uploaded)


def start_serve(work: Path, args: argparse.Namespace, endpoint: str | None) -> ServerProcess:
    """``ckreg serve`` (embedded) on a free port, its settings in the environment."""
    port = free_port()
    env = {
        "CKREG_HOME": str(work / "home"),
        "CKREG_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # closed: outbox only
        "CKREG_TASK_VECTORS_ON_COMPLETE": "false",
        "PREFECT_HOME": str(work / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    if args.database_url:
        env["CKREG_DATABASE_URL"] = args.database_url
    if endpoint is not None:
        env |= {**S3_ENV, "CKREG_STORE_URL": "s3://ckreg-load/ckreg"}
        env["CKREG_S3_ENDPOINT_URL"] = endpoint
    tree = str(Path(args.server_tree).resolve()) if args.server_tree else env["PYTHONPATH"]
    env["PYTHONPATH"] = tree
    code = f"import sys; sys.path.insert(0, {tree!r}); from flows.cli import app; app()"
    extra = shlex.split(args.serve_args)
    if args.workers > 1:  # only then: a --server-tree from before --workers still runs
        extra += ["--workers", str(args.workers)]
    command = [sys.executable, "-c", code, "serve", "--port", str(port), *extra]
    return start_server(command, port=port, log_path=work / "serve.log", env=env)


def _bucket(endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys())
    s3.create_bucket(Bucket="ckreg-load")


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def create_tokens(database_url: str, count: int) -> list[str]:
    """``count`` write tokens (one per client, as separate users would have), in one session."""
    from registry.db import make_engine, session_scope
    from registry.services import create_token

    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            return [
                create_token(session=session, name=f"load-{i}", scopes=["write"])[1]
                for i in range(count)
            ]
    finally:
        engine.dispose()


def cpu_groups(server: ServerProcess, moto: ServerProcess | None, database_url: str) -> CpuMeter:
    """Components whose CPU is counted: each process goes to the first group that picks it."""
    groups: dict[str, int | str] = {"registry (ckreg serve + children)": server.pid}
    if moto is not None:
        groups["moto_server (S3)"] = moto.pid
    if database_url.startswith("postgresql"):
        groups["PostgreSQL backends"] = f" {database_url.rsplit('/', 1)[-1].split('?')[0]} "
    groups["load generator (this process)"] = os.getpid()
    return CpuMeter(groups)


def measure(server: ServerProcess, moto: ServerProcess | None, args: argparse.Namespace) -> bool:
    """Phases 1-5 of the module docstring against a started server; True when the run had
    neither errors nor mismatches. Prints the report."""
    database_url = args.database_url or f"sqlite:///{args.work / 'home' / 'registry.db'}"
    tokens = create_tokens(database_url, args.clients)
    if args.idle_timeout > 0:
        wait_until_idle(server.pid, timeout=args.idle_timeout)
    stats = Stats()
    asyncio.run(run_clients(server.url, tokens, args, stats, phase="warmup"))
    runs: dict[str, Any] = {}
    for phase in ("reference", "mix"):
        stats = stats.next_phase()
        load_before = load_average()
        meter = cpu_groups(server, moto, database_url).start()
        elapsed = asyncio.run(run_clients(server.url, tokens, args, stats, phase=phase))
        runs[phase] = (stats, elapsed, meter.stop(), meter.machine_s, load_before, load_average())
    backlog = CpuMeter({"server": server.pid}).start()
    waited = wait_until_idle(server.pid, timeout=args.idle_timeout) if args.idle_timeout else 0.0
    runs["drain"] = (waited, backlog.stop()["server"])
    verified = verify_all(server.url, tokens[0], stats)
    return report_run(runs, verified, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=30, help="Concurrent clients.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of measured mix.")
    parser.add_argument("--warmup", type=float, default=5.0, help="Seconds of unreported mix.")
    parser.add_argument(
        "--reference-duration", type=float, default=5.0, help="Seconds of GET /healthz."
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=240.0,
        help="Most seconds to wait for the started server to go idle (0: do not wait).",
    )
    parser.add_argument("--write-share", type=float, default=0.2, help="Share of registrations.")
    parser.add_argument("--database-url", default="", help="Default: SQLite in a temp dir.")
    parser.add_argument("--s3", action="store_true", help="S3 store on a local moto_server.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="HTTP library of the load generator (httpx costs ~8x the CPU per request).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes of `ckreg serve` (its --workers; embedded flows run once).",
    )
    parser.add_argument(
        "--serve-args",
        default="",
        help="Extra `ckreg serve` options, one string (e.g. --serve-args='--mode server').",
    )
    parser.add_argument(
        "--server-tree",
        default="",
        help="Run `ckreg serve` from this source tree (e.g. `git archive` of an older commit) "
        "to compare code paths under the same load generator; default: this checkout.",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckreg-load-") as tmp:
        args.work = Path(tmp)
        moto = start_moto(args.work) if args.s3 else None
        try:
            if moto is not None:
                _bucket(moto.url)
            with start_serve(args.work, args, moto.url if moto else None) as server:
                clean = measure(server, moto, args)
        finally:
            if moto is not None:
                moto.stop()
    return 0 if clean else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
