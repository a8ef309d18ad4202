"""How long ``ckreg gc`` takes on a store of many blobs, next to the floor: one full listing.

``python -m bench.gc_scale --rows 5000 --orphans 1000`` fills a SQLite registry with ``rows``
ready checkpoints (one file each) and the store with their blobs plus ``orphans`` unreferenced
ones, on the file store and on S3 (``moto_server`` over HTTP), then times a plain listing of
``blobs/`` (the reference), a dry run and a deleting run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlmodel import Session

from bench._common import S3_ENV, load_average, print_table, start_moto
from registry.db import make_engine, upgrade_database
from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointKind, CheckpointStatus
from registry.services.gc import collect_garbage
from registry.storage import ObjectStore, open_store


def _fill(store: ObjectStore, database_url: str, rows: int, orphans: int) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(lambda _: store.put_bytes(os.urandom(64)), range(rows + orphans)))
    engine = make_engine(database_url)
    with Session(engine) as session:
        for index, info in enumerate(infos[:rows]):
            checkpoint = Checkpoint(
                name=f"c{index}", kind=CheckpointKind.base, status=CheckpointStatus.ready
            )
            session.add(checkpoint)
            session.flush()
            session.add(
                Artifact(
                    checkpoint_id=checkpoint.id or 0,
                    role=ArtifactRole.weights,
                    name="model.safetensors",
                    blob_key=info.key,
                    sha256=info.sha256,
                    size=info.size,
                )
            )
        session.commit()
    engine.dispose()


def _timed_gc(store: ObjectStore, database_url: str, *, dry_run: bool) -> tuple[float, int]:
    engine = make_engine(database_url)
    later = datetime.now(UTC) + timedelta(hours=2)  # every blob is past the 1 h grace period
    started = time.perf_counter()
    with Session(engine) as session:
        report = collect_garbage(
            session=session,
            store=store,
            grace_s=3600,
            upload_ttl_s=86400,
            dry_run=dry_run,
            now=later,
        )
    elapsed = time.perf_counter() - started
    engine.dispose()
    return elapsed, len(report.orphans if dry_run else report.deleted)


def _measure(name: str, store: ObjectStore, workdir: Path, rows: int, orphans: int) -> list[object]:
    database_url = f"sqlite:///{workdir / f'{name}.db'}"
    upgrade_database(database_url)
    _fill(store, database_url, rows, orphans)
    started = time.perf_counter()
    listed = sum(1 for _ in store.list("blobs/"))
    listing = time.perf_counter() - started
    dry, found = _timed_gc(store, database_url, dry_run=True)
    wet, deleted = _timed_gc(store, database_url, dry_run=False)
    assert found == deleted == orphans and sum(1 for _ in store.list("blobs/")) == rows
    return [name, listed, listing, dry, dry / listing, wet, deleted, deleted / max(wet - dry, 1e-9)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--orphans", type=int, default=1000)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results.append(
            _measure(
                "file", open_store(f"file://{workdir / 'store'}"), workdir, args.rows, args.orphans
            )
        )
        os.environ.update(S3_ENV)
        moto = start_moto(workdir)
        try:
            client = open_store("s3://gc-bench/ckreg", endpoint_url=moto.url)
            client.client.create_bucket(Bucket="gc-bench")  # type: ignore[attr-defined]
            results.append(_measure("s3 (moto)", client, workdir, args.rows, args.orphans))
        finally:
            moto.stop()
    print_table(
        f"ckreg gc: {args.rows} referenced blobs + {args.orphans} orphans ({load_average()})",
        [
            "store",
            "blobs",
            "listing s (reference)",
            "dry run s",
            "dry run / listing",
            "delete run s",
            "deleted",
            "deletes/s",
        ],
        results,
    )


if __name__ == "__main__":
    main()
