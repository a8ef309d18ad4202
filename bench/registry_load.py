"""Load benchmark: N concurrent clients mixing registrations and reads against one ``ckreg serve``.

``python -m bench.registry_load --clients 30 --duration 30 --s3 --database-url postgresql+psycopg://...``
starts ``ckreg serve`` (embedded mode, its own process; with ``--s3`` an S3 store on a
``moto_server`` this program starts; SQLite in a temp dir unless ``--database-url``), then runs
``--clients`` asyncio clients (one API token each) for ``--duration`` seconds. Each client, in a
loop, registers a tiny checkpoint (create -> PUT -> complete: three requests) with probability
``--write-share``, else reads: a page of the listing, one checkpoint, or a file download
(checked against the sha256 it was uploaded with). Afterwards every ready checkpoint's file is downloaded and verified.

Reported: requests/s over the run, and count / errors / p50 / p95 / p99 (ms) per operation.
Goal (issue 18, 2-core machine): >= 100 requests/s with 30 clients, p95 of reads < 250 ms,
0 errors, 0 mismatches.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    S3_ENV,
    ServerProcess,
    create_token,
    free_port,
    load_average,
    percentile,
    print_table,
    start_moto,
    start_server,
)

READS = ("list", "show", "download")
TARGET_RPS, TARGET_READ_P95_MS = 100.0, 250.0


@dataclass
class Stats:
    """Latencies (s) and error messages per operation; what each ready checkpoint should hold."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    uploaded: dict[int, str] = field(default_factory=dict)  # checkpoint id -> sha256 of its file
    mismatches: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values()) + sum(
            len(v) for v in self.errors.values()
        )


def tiny_file(seed: int) -> bytes:
    """A ~1 KiB safetensors file, different per seed."""
    import torch
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    return save({"w": torch.randn(16, 16, generator=gen), "b": torch.randn(16, generator=gen)})


async def _timed(stats: Stats, op: str, call: Any, expect: int) -> Any:
    start = time.perf_counter()
    try:
        reply = await call
    except Exception as exc:  # a refused or dropped connection is an error of this operation
        stats.errors[op].append(f"{type(exc).__name__}: {exc}")
        return None
    stats.latencies[op].append(time.perf_counter() - start)
    if reply.status_code != expect:
        stats.latencies[op].pop()
        stats.errors[op].append(f"{reply.status_code}: {reply.text[:200]}")
        return None
    return reply


async def register(client: Any, stats: Stats, seed: int) -> None:
    data = tiny_file(seed)
    body = {"name": f"load-{seed}", "kind": "base"}
    created = await _timed(stats, "create", client.post("/api/v1/checkpoints", json=body), 201)
    if created is None:
        return
    checkpoint_id = created.json()["id"]
    url = f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"
    if await _timed(stats, "put", client.put(url, content=data), 200) is None:
        return
    done = client.post(f"/api/v1/checkpoints/{checkpoint_id}/complete", json={})
    if await _timed(stats, "complete", done, 200) is not None:
        stats.uploaded[checkpoint_id] = hashlib.sha256(data).hexdigest()


async def read(client: Any, stats: Stats, rng: random.Random) -> None:
    op = rng.choice(READS)
    if op == "list" or not stats.uploaded:
        offset = rng.randrange(0, max(1, len(stats.uploaded)))
        await _timed(
            stats, "list", client.get(f"/api/v1/checkpoints?limit=20&offset={offset}"), 200
        )
        return
    checkpoint_id = rng.choice(list(stats.uploaded))
    if op == "show":
        await _timed(stats, "show", client.get(f"/api/v1/checkpoints/{checkpoint_id}"), 200)
        return
    url = f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"
    reply = await _timed(stats, "download", client.get(url), 200)
    if (
        reply is not None
        and hashlib.sha256(reply.content).hexdigest() != stats.uploaded[checkpoint_id]
    ):
        stats.mismatches.append(f"checkpoint {checkpoint_id} (during the run)")


async def run_clients(url: str, tokens: list[str], args: argparse.Namespace, stats: Stats) -> float:
    """Run the clients (one token each, as separate users would have) for ``args.duration``
    seconds; returns the elapsed seconds."""
    import httpx

    deadline = time.monotonic() + args.duration
    counter = iter(range(10**9))

    async def one(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        headers = {"Authorization": f"Bearer {tokens[index]}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            while time.monotonic() < deadline:
                if rng.random() < args.write_share:
                    await register(client, stats, next(counter))
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
    command = [sys.executable, "-c", "from flows.cli import app; app()", "serve", "--port"]
    return start_server([*command, str(port)], port=port, log_path=work / "serve.log", env=env)


def _bucket(endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys())
    s3.create_bucket(Bucket="ckreg-load")


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def report(stats: Stats, elapsed: float, verified: int, args: argparse.Namespace) -> bool:
    """Print the tables; True when every goal is met."""
    rows = []
    for op in ("create", "put", "complete", *READS):
        seconds = stats.latencies.get(op, [])
        ms = [s * 1000 for s in seconds] or [float("nan")]
        errors = len(stats.errors.get(op, []))
        rows.append([op, len(seconds), errors, *(percentile(ms, q) for q in (50, 95, 99))])
    print_table(
        f"registry load: {args.clients} clients, {elapsed:.1f} s, write share {args.write_share}"
        f" ({load_average()})",
        ("operation", "ok", "errors", "p50 ms", "p95 ms", "p99 ms"),
        rows,
    )
    rps = stats.requests / elapsed
    read_ms = [s * 1000 for op in READS for s in stats.latencies.get(op, [])]
    read_p95 = percentile(read_ms, 95) if read_ms else float("nan")
    errors = sum(len(v) for v in stats.errors.values())
    print(
        f"\n{stats.requests} requests, {rps:.1f} requests/s; reads p95 {read_p95:.1f} ms; "
        f"{errors} errors; {verified} checkpoints verified, {len(stats.mismatches)} mismatches"
    )
    for op, messages in stats.errors.items():
        for message in messages[:3]:
            print(f"  {op} error: {message}")
    met = rps >= TARGET_RPS and read_p95 < TARGET_READ_P95_MS and not errors
    return met and not stats.mismatches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=30, help="Concurrent clients.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of load.")
    parser.add_argument("--write-share", type=float, default=0.2, help="Share of registrations.")
    parser.add_argument("--database-url", default="", help="Default: SQLite in a temp dir.")
    parser.add_argument("--s3", action="store_true", help="S3 store on a local moto_server.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckreg-load-") as tmp:
        work = Path(tmp)
        moto = start_moto(work) if args.s3 else None
        try:
            endpoint = moto.url if moto is not None else None
            if endpoint is not None:
                _bucket(endpoint)
            with start_serve(work, args, endpoint) as server:
                database_url = args.database_url or f"sqlite:///{work / 'home' / 'registry.db'}"
                tokens = [create_token(database_url) for _ in range(args.clients)]
                stats = Stats()
                elapsed = asyncio.run(run_clients(server.url, tokens, args, stats))
                verified = verify_all(server.url, tokens[0], stats)
                met = report(stats, elapsed, verified, args)
        finally:
            if moto is not None:
                moto.stop()
    print("goals met" if met else "goals NOT met")
    return 0 if not stats.mismatches and not sum(map(len, stats.errors.values())) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
