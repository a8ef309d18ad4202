"""Header reads on complete: one range request for a typical safetensors header, a second one
(for the bytes past the prefetched prefix only) when the header is longer (moto_server over HTTP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from registry.models import Artifact, ArtifactRole
from registry.safetensors_check import inspect_safetensors_header
from registry.services.validation import _prefetching_reader, _reader, inspect_artifact
from registry.settings import Settings
from registry.storage import open_store
from registry.storage.s3 import S3ObjectStore
from tests.registry.registry_fixtures import st_bytes, tiny_state


def _store_with_ranges(url: str, endpoint: str) -> tuple[S3ObjectStore, list[str]]:
    """An S3 store and the list that records the ``Range`` of every GetObject it sends."""
    store = open_store(
        url, endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    assert isinstance(store, S3ObjectStore)
    ranges: list[str] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        ranges.append(str(params.get("Range")))

    store.client.meta.events.register("before-parameter-build.s3.GetObject", record)
    return store, ranges


def test_small_header_is_read_in_one_request(
    s3_store_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    store, ranges = _store_with_ranges(s3_store_url, s3_endpoint)
    data = st_bytes(tiny_state(0), metadata={"format": "pt"})
    info = store.put_bytes(data)
    artifact = Artifact(
        checkpoint_id=1,
        role=ArtifactRole.weights,
        name="model.safetensors",
        sha256=info.sha256,
        size=info.size,
        blob_key=info.key,
    )
    header = inspect_artifact(store=store, settings=Settings(home=tmp_path), artifact=artifact)
    assert ranges == [f"bytes=0-{len(data) - 1}"]  # the whole (small) file, once
    assert set(header.tensors) == set(tiny_state(0)) and header.metadata == {"format": "pt"}


def test_longer_header_reads_only_the_rest(s3_store_url: str, s3_endpoint: str) -> None:
    store, ranges = _store_with_ranges(s3_store_url, s3_endpoint)
    data = st_bytes(tiny_state(1))
    key = store.put_bytes(data).key
    expected = inspect_safetensors_header(_reader(store, key), len(data), name="m")
    ranges.clear()
    header = inspect_safetensors_header(
        _prefetching_reader(store, key, len(data), prefetch=64), len(data), name="m"
    )
    assert header == expected
    header_end = header.data_offset - 1
    assert ranges == ["bytes=0-63", f"bytes=64-{header_end}"]
    # Reads past the prefix (the NaN scan's) go to the store as they are.
    read = _prefetching_reader(store, key, len(data), prefetch=64)
    assert read(0, 8) + read(8, 8) == data[:16] and read(len(data) - 4, 4) == data[-4:]
