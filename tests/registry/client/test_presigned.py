"""Presigned multipart uploads against a real S3 endpoint (moto_server over HTTP): the test
PUTs the parts straight to the presigned URLs with httpx, as a client would."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.client import Client, ClientError
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state

MIB = 1024 * 1024


def _start(api: Api, checkpoint_id: int, name: str, data: bytes, **extra: Any) -> Any:
    body = {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()} | extra
    return api.client.post(
        f"/api/v1/checkpoints/{checkpoint_id}/uploads", json=body, headers=api.headers
    )


def _put_parts(plan: dict[str, Any], data: bytes) -> list[dict[str, Any]]:
    done = []
    step = plan["part_size"]
    for part in plan["parts"]:
        first = (part["part_number"] - 1) * step
        reply = httpx.put(part["url"], content=data[first : first + step])
        assert reply.status_code == 200, reply.text
        done.append({"part_number": part["part_number"], "etag": reply.headers["ETag"]})
    return done


def _complete(api: Api, checkpoint_id: int, upload_id: str, parts: list[dict[str, Any]]) -> Any:
    return api.client.post(
        f"/api/v1/checkpoints/{checkpoint_id}/uploads/{upload_id}/complete",
        json={"parts": parts},
        headers=api.headers,
    )


@pytest.mark.s3
def test_presigned_multipart_happy_path(s3_api: Api) -> None:
    weights = st_bytes(tiny_state(0))
    big = bytes(range(256)) * (24 * 1024) + b"tail"  # 6 MiB + 4 bytes: two parts of 5 MiB max
    checkpoint = s3_api.register({"model.safetensors": weights}, name="base", complete=False)
    started = _start(s3_api, checkpoint["id"], "notes.bin", big, part_size=5 * MIB)
    assert started.status_code == 201, started.text
    plan = started.json()
    assert plan["key"].endswith(f"/tmp/{plan['upload_id']}") and len(plan["parts"]) == 2
    done = _complete(s3_api, checkpoint["id"], plan["upload_id"], _put_parts(plan, big))
    assert done.status_code == 200, done.text
    digest = hashlib.sha256(big).hexdigest()
    assert done.json() | {"deduplicated": None} == {
        "name": "notes.bin",
        "sha256": digest,
        "size": len(big),
        "role": "config",
        "deduplicated": None,
        "codec": "raw",
        "stored_size": len(big),
    }
    assert not list(s3_api.env.store.list("tmp/"))
    ready = s3_api.client.post(
        f"/api/v1/checkpoints/{checkpoint['id']}/complete", json={}, headers=s3_api.headers
    )
    assert ready.status_code == 200, ready.text
    got = s3_api.client.get(f"/api/v1/checkpoints/{checkpoint['id']}/files/notes.bin")
    assert got.status_code == 200 and got.content == big


@pytest.mark.s3
def test_presigned_sha_mismatch_leaves_nothing(s3_api: Api) -> None:
    checkpoint = s3_api.register({}, name="c", complete=False)
    data = b"declared bytes"
    plan = _start(s3_api, checkpoint["id"], "a.json", data).json()
    done = _complete(
        s3_api, checkpoint["id"], plan["upload_id"], _put_parts(plan, b"other bytes!!!")
    )
    assert done.status_code == 422, done.text
    assert done.json()["detail"]["error"] == "sha256_mismatch"
    assert done.json()["detail"]["file"] == "a.json"
    assert not list(s3_api.env.store.list("tmp/")) and s3_api.env.blobs() == []
    assert s3_api.env.artifact_rows(checkpoint["id"]) == []
    assert s3_api.env.checkpoint(checkpoint["id"]).status == "pending"


@pytest.mark.s3
def test_presigned_abort_and_bad_ids(s3_api: Api) -> None:
    checkpoint = s3_api.register({}, name="c", complete=False)
    data = b"x" * 100
    plan = _start(s3_api, checkpoint["id"], "a.bin", data).json()
    _put_parts(plan, data)
    url = f"/api/v1/checkpoints/{checkpoint['id']}/uploads/{plan['upload_id']}"
    assert s3_api.client.delete(url, headers=s3_api.headers).status_code == 204
    assert s3_api.client.delete(url, headers=s3_api.headers).status_code == 404
    assert not list(s3_api.env.store.list("tmp/"))
    gone = _complete(s3_api, checkpoint["id"], plan["upload_id"], [])
    assert gone.status_code == 404, gone.text
    bad = _complete(s3_api, checkpoint["id"], "../../blobs", [])
    assert bad.status_code in (404, 422), bad.text
    assert _start(s3_api, checkpoint["id"], "../x", data).status_code == 422
    assert _start(s3_api, checkpoint["id"], "a.bin", data, part_size=1024).status_code == 201
    no_token = s3_api.client.post(
        f"/api/v1/checkpoints/{checkpoint['id']}/uploads",
        json={"name": "a", "size": 1, "sha256": "0" * 64},
    )
    assert no_token.status_code == 401


def test_file_store_refuses_presigned(api: Api) -> None:
    checkpoint = api.register({}, name="c", complete=False)
    reply = _start(api, checkpoint["id"], "a.bin", b"abc")
    assert reply.status_code == 409, reply.text
    assert reply.json()["detail"]["error"] == "presigned_unsupported"
    assert "presigned uploads need an S3 store" in reply.json()["detail"]["message"]


class _ViaTestClient(httpx.BaseTransport):
    """An httpx transport that hands each request to the app's TestClient (which may be built on
    another HTTP library), so ``registry.client.Client`` talks to the in-process app."""

    def __init__(self, api: Api) -> None:
        self.test_client = api.client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        reply = self.test_client.request(
            request.method, str(request.url), headers=dict(request.headers), content=request.read()
        )
        return httpx.Response(
            reply.status_code, headers=list(reply.headers.multi_items()), content=reply.content
        )


def _client(api: Api) -> Client:
    client = Client("http://testserver", token=None, presigned_threshold=1)
    client._http = httpx.Client(
        transport=_ViaTestClient(api),
        base_url="http://testserver/api/v1",
        headers=api.headers,
    )
    return client


@pytest.mark.s3
def test_client_uses_presigned_above_threshold(s3_api: Api, tmp_path: Path) -> None:
    checkpoint = s3_api.register({}, name="c", complete=False)
    path = tmp_path / "big.bin"
    path.write_bytes(b"0123456789" * 1000)
    client = _client(s3_api)
    public = client.upload_file(checkpoint["id"], path, progress=False)
    assert public["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert client.last_upload_presigned is True
    assert not list(s3_api.env.store.list("tmp/"))


def test_client_falls_back_to_put_on_file_store(api: Api, tmp_path: Path) -> None:
    checkpoint = api.register({}, name="c", complete=False)
    path = tmp_path / "big.bin"
    path.write_bytes(b"abc" * 100)
    client = _client(api)
    public = client.upload_file(checkpoint["id"], path, progress=False)
    assert public["size"] == 300 and client.last_upload_presigned is False
    with pytest.raises(ClientError) as refused:
        client.upload_file(checkpoint["id"], path, name="b.bin", progress=False, presigned=True)
    assert refused.value.status == 409 and refused.value.error == "presigned_unsupported"
