"""HTTP Range on ``GET /checkpoints/{id}/files/{name}``, on the file store and on S3."""

from __future__ import annotations

import pytest

from registry.api.routes.files import parse_range
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api

DATA = bytes(range(256)) * 4  # 1024 bytes


def _check_ranges(api: Api) -> None:
    checkpoint = api.register({"notes.bin": DATA}, name="c", complete=False)
    url = f"/api/v1/checkpoints/{checkpoint['id']}/files/notes.bin"
    full = api.client.get(url)
    assert full.status_code == 200 and full.content == DATA
    assert full.headers["accept-ranges"] == "bytes"
    cases = {
        "bytes=0-9": (0, 10),
        "bytes=1000-": (1000, 1024),
        "bytes=-24": (1000, 1024),
        "bytes=1020-5000": (1020, 1024),
        "bytes=-5000": (0, 1024),
        "bytes=1023-1023": (1023, 1024),
    }
    for header, (start, end) in cases.items():
        part = api.client.get(url, headers={"Range": header})
        assert part.status_code == 206, (header, part.text)
        assert part.content == DATA[start:end], header
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/1024", header
        assert part.headers["content-length"] == str(end - start)
    for header in ("bytes=1024-", "bytes=2000-3000", "bytes=-0"):
        refused = api.client.get(url, headers={"Range": header})
        assert refused.status_code == 416, header
        assert refused.headers["content-range"] == "bytes */1024"
    for header in ("bytes=0-1,5-9", "items=0-3", "bytes=5-2", "bytes=x-3", "bytes=-"):
        ignored = api.client.get(url, headers={"Range": header})
        assert ignored.status_code == 200 and ignored.content == DATA, header


def test_range_file_store(api: Api) -> None:
    _check_ranges(api)


@pytest.mark.s3
def test_range_s3_store(s3_api: Api) -> None:
    _check_ranges(s3_api)


def test_parse_range_edges() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-", 10) == (0, 10)
    assert parse_range(" bytes = 2-3", 10) == (2, 4)
    with pytest.raises(ValueError):
        parse_range("bytes=0-", 0)
    with pytest.raises(ValueError):
        parse_range("bytes=-3", 0)
