"""The S3 floor of ``bench.merge_from_s3``: GET every stored byte of a merge's inputs once from the
same endpoint, as fast as the client can — ranged GETs of ``part`` bytes on ``workers`` threads
through the registry's own ``S3Store.iter_bytes`` (the call the engine's range sources make),
each body drained into nothing. No decoding, no arithmetic, nothing written: what a streamed
merge could at best take if reading were all it did.

Also here: ``count_wire``, which hooks botocore to count the requests and body bytes a client
really moved (the merge children and the floor child use it alike).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

MIB = 1024 * 1024


def count_wire(store: Any) -> dict[str, int]:
    """Counters (GetObject, HeadObject, other requests; GetObject body bytes) that ``store``'s
    S3 client updates from now on, thread-safe."""
    wire = {"GetObject": 0, "HeadObject": 0, "other": 0, "bytes": 0}
    lock = threading.Lock()

    def before(model: Any, **_: Any) -> None:
        with lock:
            wire[model.name if model.name in wire else "other"] += 1

    def after(parsed: dict[str, Any], **_: Any) -> None:
        with lock:
            wire["bytes"] += int(parsed.get("ContentLength", 0))

    store.client.meta.events.register("before-call.s3", before)
    store.client.meta.events.register("after-call.s3.GetObject", after)
    return wire


def stored_objects(database_url: str, store: Any, ids: Iterable[int]) -> dict[str, int]:
    """Store key -> stored size of every object the weights of checkpoints ``ids`` read from
    (each key once; a compressed blob's references included), sizes asked from the store."""
    from sqlmodel import Session

    from registry.db import make_engine
    from registry.models import ArtifactRole
    from registry.services.blobs import stored_blob
    from registry.services.common import checkpoint_files

    engine = make_engine(database_url)
    keys: set[str] = set()
    with Session(engine) as session:
        for checkpoint_id in ids:
            for artifact in checkpoint_files(session, checkpoint_id):
                if artifact.role == ArtifactRole.weights:
                    keys |= stored_blob(session, artifact).keys()
    engine.dispose()
    return {key: store.size(key) for key in sorted(keys)}


def download_checkpoints(
    database_url: str, store: Any, folders: dict[int, Any], *, part: int, workers: int
) -> None:
    """Download-then-merge's first half: every file of each checkpoint in ``folders`` (id ->
    new local folder; weights and config, decoded where stored compressed) written there, in
    ranged GETs of ``part`` bytes on ``workers`` threads, each range written at its offset."""
    import os
    from pathlib import Path

    from sqlmodel import Session

    from registry.db import make_engine
    from registry.services.blobs import stored_blob
    from registry.services.common import checkpoint_files
    from registry.storage.codecs import iter_original

    engine = make_engine(database_url)
    files = []
    with Session(engine) as session:
        for checkpoint_id, folder in folders.items():
            Path(folder).mkdir(parents=True)
            for artifact in checkpoint_files(session, checkpoint_id):
                path = Path(folder) / artifact.name  # a name the registry checked at upload
                path.parent.mkdir(parents=True, exist_ok=True)
                files.append((path, stored_blob(session, artifact)))
    engine.dispose()
    tasks = []
    for path, blob in files:
        path.write_bytes(b"")
        tasks += [(path, blob, start, min(start + part, blob.size))
                  for start in range(0, blob.size, part)]  # fmt: skip

    def get(task: tuple[Any, Any, int, int]) -> None:
        path, blob, start, end = task
        fd = os.open(path, os.O_WRONLY)
        try:
            offset = start
            for chunk in iter_original(store, blob, start=start, end=end):
                offset += os.pwrite(fd, chunk, offset)
        finally:
            os.close(fd)
        if offset != end:
            raise RuntimeError(
                f"range [{start}, {end}) of '{blob.key}' wrote {offset - start} bytes"
            )

    with ThreadPoolExecutor(workers, thread_name_prefix="s3-download") as pool:
        list(pool.map(get, tasks))


def _parts(objects: dict[str, int], part: int) -> list[tuple[str, int, int]]:
    return [
        (key, start, min(start + part, size))
        for key, size in objects.items()
        for start in range(0, size, part)
    ]


def fetch_all(store: Any, objects: dict[str, int], *, part: int, workers: int) -> float:
    """GET every byte of ``objects`` once (ranges of ``part`` on ``workers`` threads); returns
    the seconds it took. Raises if any range came back short."""

    def get(task: tuple[str, int, int]) -> int:
        key, start, end = task
        got = sum(len(c) for c in store.iter_bytes(key, start=start, end=end, chunk_size=MIB))
        if got != end - start:
            raise RuntimeError(f"range [{start}, {end}) of '{key}' returned {got} bytes")
        return got

    tasks = _parts(objects, part)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="s3-floor") as pool:
        total = sum(pool.map(get, tasks))
    seconds = time.perf_counter() - start
    if total != sum(objects.values()):
        raise RuntimeError(f"fetched {total} bytes, expected {sum(objects.values())}")
    return seconds
