"""Query benchmark: list/filter/paginate and lineage latencies over a registry of N checkpoints.

``python -m bench.registry_queries --checkpoints 10000`` bulk-loads a fresh SQLite database
(bases, fine-tunes across tasks/runs/tags, chains of merged checkpoints >= 6 levels deep with
their lineage edges), starts the registry under uvicorn in its own process, and times each
query over HTTP with a keep-alive client: p50/p95/max per query against the 50 ms target.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._common import latency_summary, load_average, print_table, start_registry

TARGET_MS = 50.0
CHAIN_LEVELS = 6
TASKS = 20
RUNS_PER_TASK = 10
TAGS = 30
FILE_SIZE = 500 * 1024 * 1024


@dataclass
class Seeded:
    """What the bulk load created, so queries can pick real filter values."""

    total: int = 0
    listed: int = 0  # not deleted: what an unfiltered list pages through
    bases: list[int] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    chain_tips: list[int] = field(default_factory=list)
    edges: int = 0


@dataclass
class _Rows:
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    lineage: list[dict[str, Any]] = field(default_factory=list)


class _Builder:
    """Builds row dicts for the model tables with increasing ids and creation times."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.rows = _Rows()
        self.start = datetime(2025, 1, 1, tzinfo=UTC)
        self.next_id = 1

    def checkpoint(self, *, kind: str, status: str = "ready", **fields: Any) -> int:
        checkpoint_id = self.next_id
        self.next_id += 1
        created = self.start + timedelta(seconds=checkpoint_id)
        tags = fields.pop("tags", [])
        self.rows.checkpoints.append(
            {"id": checkpoint_id, "name": f"{kind}-{checkpoint_id}", "kind": kind, "status": status}
            | {"base_id": None, "task": None, "run": None, "step": None, "error": None}
            | {"tags": tags, "metadata": {"seed": checkpoint_id}, "created_at": created}
            | {"total_bytes": FILE_SIZE, "ready_at": created if status == "ready" else None}
            | fields
        )
        self.rows.tags += [{"checkpoint_id": checkpoint_id, "tag": tag} for tag in tags]
        digest = hashlib.sha256(str(checkpoint_id).encode()).hexdigest()
        self.rows.artifacts.append(
            {"checkpoint_id": checkpoint_id, "role": "weights", "name": "model.safetensors"}
            | {"sha256": digest, "size": FILE_SIZE, "blob_key": f"blobs/sha256/{digest}"}
            | {"tensor_index": {}, "metadata": {}, "created_at": created}
        )
        return checkpoint_id

    def edge(self, parent: int, child: int, role: str) -> None:
        created = self.start + timedelta(seconds=child)
        self.rows.lineage.append(
            {"parent_id": parent, "child_id": child, "role": role, "merge_run_id": None}
            | {"created_at": created}
        )


def _status(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.90:
        return "ready"
    return "pending" if roll < 0.95 else ("failed" if roll < 0.98 else "deleted")


def _build(count: int, seed: int) -> tuple[_Rows, Seeded]:
    builder, rng = _Builder(seed), random.Random(seed)
    info = Seeded(tasks=[f"task-{i}" for i in range(TASKS)], tags=[f"tag-{i}" for i in range(TAGS)])
    info.runs = [f"{task}-run-{r}" for task in info.tasks for r in range(RUNS_PER_TASK)]
    info.bases = [builder.checkpoint(kind="base") for _ in range(max(2, count // 1000))]
    chains = max(1, count // 300)
    finetunes: list[tuple[int, int]] = []  # (id, base)
    for _ in range(count - len(info.bases) - chains * CHAIN_LEVELS):
        base, run = rng.choice(info.bases), rng.choice(info.runs)
        fields = {"base_id": base, "run": run, "task": run.split("-run-")[0]}
        fields |= {"step": rng.randrange(100, 10_000, 100), "tags": rng.sample(info.tags, 2)}
        status = _status(rng)
        kind = "adapter" if rng.random() < 0.1 else "finetune"
        finetune = builder.checkpoint(kind=kind, status=status, **fields)
        if status != "failed":
            builder.edge(base, finetune, "base")
        if status == "ready":
            finetunes.append((finetune, base))
    for _ in range(chains):
        info.chain_tips.append(_chain(builder, rng, finetunes))
    info.total, info.edges = builder.next_id - 1, len(builder.rows.lineage)
    info.listed = sum(c["status"] != "deleted" for c in builder.rows.checkpoints)
    return builder.rows, info


def _chain(builder: _Builder, rng: random.Random, finetunes: list[tuple[int, int]]) -> int:
    """A continual merge: level k merges level k-1 with one more fine-tune of the same base."""
    previous, base = rng.choice(finetunes)
    for _ in range(CHAIN_LEVELS):
        same_base = [f for f, b in finetunes if b == base]
        extra = rng.choice(same_base)
        merged = builder.checkpoint(kind="merged", base_id=base, tags=["merged"])
        for parent, role in ((base, "base"), (previous, "input"), (extra, "input")):
            builder.edge(parent, merged, role)
        previous = merged
    return previous


def seed_registry(database_url: str, *, checkpoints: int, seed: int = 0) -> Seeded:
    """Bulk-insert ``checkpoints`` rows (plus files, tags, lineage) into an upgraded database."""
    from sqlalchemy import insert

    from registry.db import make_engine
    from registry.models import Artifact, Checkpoint, CheckpointTag, Lineage

    rows, info = _build(checkpoints, seed)
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for model, batch in (
                (Checkpoint, rows.checkpoints),
                (CheckpointTag, rows.tags),
                (Artifact, rows.artifacts),
                (Lineage, rows.lineage),
            ):
                if batch:
                    connection.execute(insert(model.__table__), batch)  # type: ignore[attr-defined,union-attr]
    finally:
        engine.dispose()
    return info


def queries(info: Seeded) -> dict[str, Callable[[int], tuple[str, dict[str, Any]]]]:
    """Named query makers: request ``i`` -> (path, params), cycling through real filter values."""
    deep, half = max(0, info.listed - 50), info.listed // 2

    def pick(values: list[Any], i: int) -> Any:
        return values[i % len(values)]

    return {
        "list newest (limit 50)": lambda i: ("/checkpoints", {}),
        "filter base_id": lambda i: ("/checkpoints", {"base_id": pick(info.bases, i)}),
        "filter kind=merged": lambda i: ("/checkpoints", {"kind": "merged"}),
        "filter task": lambda i: ("/checkpoints", {"task": pick(info.tasks, i)}),
        "filter run": lambda i: ("/checkpoints", {"run": pick(info.runs, i)}),
        "filter tag": lambda i: ("/checkpoints", {"tag": pick(info.tags, i)}),
        "filter status=failed": lambda i: ("/checkpoints", {"status": "failed"}),
        "base_id+task+status=ready": lambda i: (
            "/checkpoints",
            {"base_id": pick(info.bases, i), "task": pick(info.tasks, i), "status": "ready"},
        ),
        f"page offset={half} (limit 50)": lambda i: ("/checkpoints", {"offset": half}),
        f"page offset={deep} (limit 50)": lambda i: ("/checkpoints", {"offset": deep}),
        "list limit=1000": lambda i: ("/checkpoints", {"limit": 1000}),
        "get by id": lambda i: (f"/checkpoints/{pick(info.chain_tips, i)}", {}),
        "lineage depth=5 of chain tip": lambda i: (
            f"/checkpoints/{pick(info.chain_tips, i)}/lineage",
            {"depth": 5},
        ),
    }


def _check_lineage(client: Any, tip: int) -> None:
    reply = client.get(f"/checkpoints/{tip}/lineage", params={"depth": 5})
    reply.raise_for_status()
    depths = {edge["depth"] for edge in reply.json()["ancestors"]}
    if max(depths, default=0) < 5:
        raise RuntimeError(
            f"lineage of chain tip {tip} reaches depth {max(depths, default=0)}, not 5"
        )


def measure(
    base_url: str, info: Seeded, *, requests: int, only: set[str] | None = None
) -> Iterator[tuple[str, dict[str, float]]]:
    """Time ``requests`` calls of each query over one keep-alive connection."""
    import httpx

    with httpx.Client(base_url=f"{base_url}/api/v1", timeout=60) as client:
        _check_lineage(client, info.chain_tips[0])
        for label, make in queries(info).items():
            if only and label not in only:
                continue
            path, params = make(0)
            client.get(path, params=params).raise_for_status()  # warm-up, not timed
            latencies = []
            for i in range(requests):
                path, params = make(i)
                start = time.perf_counter()
                reply = client.get(path, params=params)
                latencies.append(time.perf_counter() - start)
                reply.raise_for_status()
            yield label, latency_summary(latencies)


def run(
    checkpoints: int, *, requests: int = 200, workdir: Path | None = None
) -> dict[str, dict[str, float]]:
    """Seed, serve, measure and print the table; returns {query: {p50, p95, max, mean}} in ms."""
    from registry.db import upgrade_database

    with tempfile.TemporaryDirectory(prefix="ckreg-bench-", dir=workdir) as tmp:
        work = Path(tmp)
        database_url = f"sqlite:///{work / 'registry.db'}"
        upgrade_database(database_url)
        start = time.perf_counter()
        info = seed_registry(database_url, checkpoints=checkpoints)
        seeded = time.perf_counter() - start
        env = {
            "CKREG_HOME": str(work / "home"),
            "CKREG_DATABASE_URL": database_url,
            "CKREG_STORE_URL": f"file://{work / 'store'}",
        }
        with start_registry(work, env) as registry:
            results = dict(measure(registry.url, info, requests=requests))
    rows = [
        (label, s["p50"], s["p95"], s["max"], "ok" if s["p95"] < TARGET_MS else "SLOW")
        for label, s in results.items()
    ]
    title = (
        f"registry queries: {info.total} checkpoints, {info.edges} lineage edges, "
        f"seeded in {seeded:.1f}s; {requests} requests each; target p95 < {TARGET_MS:.0f} ms "
        f"({load_average()})"
    )
    print_table(title, ("query", "p50 ms", "p95 ms", "max ms", "vs 50 ms"), rows)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200, help="requests per query")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp dir goes")
    args = parser.parse_args(argv)
    run(args.checkpoints, requests=args.requests, workdir=args.workdir)


if __name__ == "__main__":
    main()
