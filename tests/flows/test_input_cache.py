"""The merge-input download cache: S3 blobs are fetched once, reused, and bounded in size."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flows.inputs import blob_path, prune_cache
from registry.models import Artifact, ArtifactRole
from registry.storage import open_store


def _artifact(store_blob_key: str, sha256: str, size: int) -> Artifact:
    return Artifact(
        checkpoint_id=1,
        role=ArtifactRole.weights,
        name="model.safetensors",
        sha256=sha256,
        size=size,
        blob_key=store_blob_key,
    )


def test_s3_blobs_are_downloaded_once_and_reused(
    s3_endpoint: str, s3_store_url: str, tmp_path: Path
) -> None:
    store = open_store(
        s3_store_url,
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    info = store.put_bytes(b"x" * 1000)
    artifact = _artifact(info.key, info.sha256, info.size)
    first = blob_path(store=store, artifact=artifact, cache_dir=tmp_path)
    assert first.read_bytes() == b"x" * 1000
    first_inode = first.stat().st_ino
    again = blob_path(store=store, artifact=artifact, cache_dir=tmp_path)
    assert again == first and again.stat().st_ino == first_inode  # reused, not re-downloaded


def test_prune_evicts_least_recently_used_beyond_the_bound(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    now = time.time()
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = blobs / name
        path.write_bytes(b"." * 100)
        os.utime(path, (now - 100 * age, now - 100 * age))
    freed = prune_cache(tmp_path, max_bytes=150)
    assert freed == 200
    assert sorted(p.name for p in blobs.iterdir()) == ["newest"]
    assert prune_cache(tmp_path, max_bytes=150) == 0
    assert prune_cache(tmp_path / "absent", max_bytes=0) == 0
