"""Issue 18 regressions (API side): text that is not valid Unicode, deeply nested safetensors
headers, tokens (odd bearer values, list and revoke), ``Allow`` headers and strict booleans.

Every refusal is a 4xx in the documented shape and leaves nothing behind; listings keep working.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from registry.models import Artifact, Checkpoint, CheckpointStatus
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, build_api, make_env, st_bytes, tiny_state

DEEP_HEADER = b'{"w":' + b"[" * 10000 + b"]" * 10000 + b"}"


@pytest.fixture
def rapi(database_url: str, tmp_path: Path) -> Iterator[Api]:
    environment = make_env(database_url, tmp_path, task_vectors_on_complete=False)
    yield from build_api(environment)
    environment.engine.dispose()


def post_raw(api: Api, path: str, body: str) -> Any:
    headers = {**api.headers, "Content-Type": "application/json"}
    return api.client.post(f"/api/v1{path}", content=body, headers=headers)


def assert_error(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert {"error", "message"} <= detail.keys(), detail
    for word in words:
        assert word in detail["message"], (word, detail["message"])
    return detail


def checkpoints(api: Api) -> list[Checkpoint]:
    with api.env.session() as session:
        return list(session.exec(select(Checkpoint)).all())


def with_header(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# ---- 1: text that is not valid Unicode ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"name":"ok","kind":"base","metadata":{"a":"\\udfff"}}', "body.metadata.a"),
        ('{"name":"ok\\ud800","kind":"base"}', "body.name"),
        ('{"name":"ok","kind":"base","tags":["t\\udc00"]}', "body.tags.0"),
        ('{"name":"ok","kind":"base","metadata":{"\\udfff":1}}', "key"),
    ],
)
def test_lone_surrogates_in_bodies_are_422_and_nothing_is_stored(
    rapi: Api, body: str, field: str
) -> None:
    detail = assert_error(post_raw(rapi, "/checkpoints", body), 422, field, "Unicode")
    assert detail["error"] == "invalid_text"
    assert checkpoints(rapi) == []
    listed = rapi.client.get("/api/v1/checkpoints", headers=rapi.headers)
    assert listed.status_code == 200 and listed.json()["total"] == 0


def test_listings_keep_working_beside_refused_text(rapi: Api) -> None:
    good = rapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="good")
    post_raw(rapi, "/checkpoints", '{"name":"bad","kind":"base","metadata":{"a":"\\udfff"}}')
    assert rapi.client.get("/api/v1/checkpoints", headers=rapi.headers).json()["total"] == 1
    one = rapi.client.get(f"/api/v1/checkpoints/{good['id']}", headers=rapi.headers)
    assert one.status_code == 200 and one.json()["name"] == "good"


@pytest.mark.parametrize("query", ["name=%ED%A0%80", "task=%FF", "tag%FF=x"])
def test_query_strings_that_are_not_utf8_are_422(rapi: Api, query: str) -> None:
    response = rapi.client.get(f"/api/v1/checkpoints?{query}", headers=rapi.headers)
    assert_error(response, 422, "query.", "UTF-8")


def test_path_that_is_not_utf8_is_422(rapi: Api) -> None:
    created = rapi.register({}, complete=False)
    url = f"/api/v1/checkpoints/{created['id']}/files/%FF.safetensors"
    assert_error(rapi.client.put(url, content=b"x", headers=rapi.headers), 422, "path", "UTF-8")


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (
            b'{"__metadata__":{"a":"\\udfff"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            ("value of 'a'", "Unicode"),
        ),
        (
            b'{"__metadata__":{"a":"x\\u0000"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            ("value of 'a'", "NUL"),
        ),
        (b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', ("tensor name",)),
    ],
)
def test_safetensors_header_text_is_checked_at_complete_and_for_artifacts(
    rapi: Api, header: bytes, words: tuple[str, ...]
) -> None:
    data = with_header(header, b"\0" * 4)
    created = rapi.register({"model.safetensors": data}, complete=False)
    done = rapi.client.post(
        f"/api/v1/checkpoints/{created['id']}/complete", json={}, headers=rapi.headers
    )
    assert_error(done, 422, "model.safetensors", *words)
    assert rapi.env.checkpoint(created["id"]).status == CheckpointStatus.failed
    base = rapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    artifact = rapi.client.post(
        f"/api/v1/checkpoints/{base['id']}/artifacts?role=fisher",
        content=data,
        headers=rapi.headers,
    )
    assert_error(artifact, 422, *words)
    assert rapi.env.artifact_rows(base["id"])[0].role == "weights"
    listed = rapi.client.get(f"/api/v1/checkpoints/{base['id']}/artifacts", headers=rapi.headers)
    assert listed.status_code == 200
    assert rapi.client.get("/api/v1/checkpoints", headers=rapi.headers).status_code == 200


# ---- 2: deeply nested safetensors header -------------------------------------------------------


def test_deeply_nested_header_fails_the_checkpoint_cleanly_and_a_retry_works(rapi: Api) -> None:
    created = rapi.register({"model.safetensors": with_header(DEEP_HEADER)}, complete=False)
    url = f"/api/v1/checkpoints/{created['id']}/complete"
    assert_error(rapi.client.post(url, json={}, headers=rapi.headers), 422, "nested too deeply")
    assert rapi.env.checkpoint(created["id"]).status == CheckpointStatus.failed
    assert rapi.env.artifact_rows(created["id"]) == []  # its blob is released to gc
    again = rapi.client.post(url, json={}, headers=rapi.headers)
    assert_error(again, 409, "failed")  # a clear state answer, not a 500
    retry = rapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="retry")
    assert retry["status"] == "ready"


def test_deeply_nested_header_in_an_artifact_upload_is_422(rapi: Api) -> None:
    base = rapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    response = rapi.client.post(
        f"/api/v1/checkpoints/{base['id']}/artifacts?role=fisher",
        content=with_header(DEEP_HEADER),
        headers=rapi.headers,
    )
    assert_error(response, 422, "nested too deeply")
    with rapi.env.session() as session:
        rows = session.exec(select(Artifact).where(Artifact.checkpoint_id == base["id"])).all()
    assert [row.role for row in rows] == ["weights"]
