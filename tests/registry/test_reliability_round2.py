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


@pytest.fixture
def sapi(tmp_path: Path) -> Iterator[Api]:
    """SQLite only: for checks made before the database is involved."""
    environment = make_env(f"sqlite:///{tmp_path / 'r.db'}", tmp_path)
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
def test_query_strings_that_are_not_utf8_are_422(sapi: Api, query: str) -> None:
    response = sapi.client.get(f"/api/v1/checkpoints?{query}", headers=sapi.headers)
    assert_error(response, 422, "query.", "UTF-8")


def test_path_that_is_not_utf8_is_422(sapi: Api) -> None:
    created = sapi.register({}, complete=False)
    url = f"/api/v1/checkpoints/{created['id']}/files/%FF.safetensors"
    assert_error(sapi.client.put(url, content=b"x", headers=sapi.headers), 422, "path", "UTF-8")


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


def test_deeply_nested_adapter_config_is_422(rapi: Api) -> None:
    base = rapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    files = {
        "adapter_model.safetensors": st_bytes(tiny_state(1)),
        "adapter_config.json": b"[" * 10000 + b"]" * 10000,
    }
    adapter = rapi.register(files, name="lora", kind="adapter", base_id=base["id"], complete=False)
    done = rapi.client.post(
        f"/api/v1/checkpoints/{adapter['id']}/complete", json={}, headers=rapi.headers
    )
    assert_error(done, 422, "adapter_config.json")
    assert rapi.env.checkpoint(adapter["id"]).status == CheckpointStatus.failed


# ---- 4: presigned uploads are tied to their checkpoint ----------------------------------------


@pytest.mark.s3
def test_presigned_upload_of_b_cannot_be_aborted_or_completed_through_a(s3_api: Api) -> None:
    import hashlib

    import httpx

    a = s3_api.register({}, name="a", complete=False)
    b = s3_api.register({}, name="b", complete=False)
    data = b"bytes of b" * 10
    body = {"name": "b.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    started = s3_api.client.post(
        f"/api/v1/checkpoints/{b['id']}/uploads", json=body, headers=s3_api.headers
    )
    assert started.status_code == 201, started.text
    plan = started.json()
    put = httpx.put(plan["parts"][0]["url"], content=data)
    parts = [{"part_number": 1, "etag": put.headers["ETag"]}]
    through_a = f"/api/v1/checkpoints/{a['id']}/uploads/{plan['upload_id']}"
    assert_error(s3_api.client.delete(through_a, headers=s3_api.headers), 404, "no upload")
    completed = s3_api.client.post(
        f"{through_a}/complete", json={"parts": parts}, headers=s3_api.headers
    )
    assert_error(completed, 404, f"checkpoint {a['id']}", "no upload")
    assert s3_api.env.artifact_rows(a["id"]) == []
    # B's upload is untouched: it completes through B.
    done = s3_api.client.post(
        f"/api/v1/checkpoints/{b['id']}/uploads/{plan['upload_id']}/complete",
        json={"parts": parts},
        headers=s3_api.headers,
    )
    assert done.status_code == 200, done.text
    assert [row.name for row in s3_api.env.artifact_rows(b["id"])] == ["b.bin"]


# ---- 7: tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "Bearer tök".encode(),
        b"Bearer ckr_\xb2_secret",  # latin-1 superscript two: str.isdigit() is True
        b"Bearer ckr_1_s\xe9cret",
        b"Bearer ckr_99999999999999999999999_abc",
        f"Bearer ckr_{2**63}_abc".encode(),
    ],
)
def test_odd_bearer_tokens_are_401(sapi: Api, value: bytes) -> None:
    response = sapi.client.post(
        "/api/v1/checkpoints",
        json={"name": "x", "kind": "base"},
        headers={"Authorization": value},  # type: ignore[dict-item]
    )
    assert_error(response, 401, "invalid or revoked token")
    assert checkpoints(sapi) == []


def _admin(api: Api) -> dict[str, str]:
    from registry.services import create_token

    with api.env.session() as session:
        _, secret = create_token(session=session, name="admin", scopes=["admin"])
    return {"Authorization": f"Bearer {secret}"}


def test_admin_lists_and_revokes_tokens_effective_on_the_next_request(rapi: Api) -> None:
    admin = _admin(rapi)
    assert_error(rapi.client.get("/api/v1/admin/tokens", headers=rapi.headers), 403, "admin")
    listed = rapi.client.get("/api/v1/admin/tokens", headers=admin)
    assert listed.status_code == 200, listed.text
    assert [(t["name"], t["revoked"]) for t in listed.json()] == [
        ("writer", False),
        ("reader", False),
        ("admin", False),
    ]
    assert all("hash" not in key for t in listed.json() for key in t)
    writer_id = listed.json()[0]["id"]
    assert rapi.client.post(
        "/api/v1/checkpoints", json={"name": "a", "kind": "base"}, headers=rapi.headers
    ).is_success
    revoked = rapi.client.delete(f"/api/v1/admin/tokens/{writer_id}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    refused = rapi.client.post(
        "/api/v1/checkpoints", json={"name": "b", "kind": "base"}, headers=rapi.headers
    )
    assert_error(refused, 401, "revoked")
    assert_error(rapi.client.delete("/api/v1/admin/tokens/999", headers=admin), 404, "999")
    again = rapi.client.get("/api/v1/admin/tokens", headers=admin).json()
    assert again[0]["revoked"] is True and again[1]["revoked"] is False


def test_cli_token_list_and_revoke(rapi: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from registry.settings import get_settings

    monkeypatch.setenv("CKREG_DATABASE_URL", rapi.env.settings.database_url)
    monkeypatch.setenv("CKREG_STORE_URL", rapi.env.settings.store_url)
    get_settings.cache_clear()
    try:
        listed = CliRunner().invoke(app, ["token", "list"])
        assert listed.exit_code == 0, listed.output
        assert "writer" in listed.output and "reader" in listed.output and "active" in listed.output
        assert "ckr_" not in listed.output
        revoked = CliRunner().invoke(app, ["token", "revoke", "2"])
        assert revoked.exit_code == 0 and "revoked token 2 'reader'" in revoked.output
        reads = rapi.client.get("/api/v1/admin/tokens", headers=rapi.read_headers)
        assert reads.status_code == 401
        missing = CliRunner().invoke(app, ["token", "revoke", "99"])
        assert missing.exit_code == 1 and "token 99 not found" in missing.output
        assert "revoked" in CliRunner().invoke(app, ["token", "list"]).output
    finally:
        get_settings.cache_clear()


# ---- 7: small ones: store locations, Allow headers, strict booleans ----------------------------


def test_file_store_refusal_does_not_show_its_path(sapi: Api) -> None:
    created = sapi.register({}, complete=False)
    body = {"name": "a.bin", "size": 3, "sha256": "0" * 64}
    reply = sapi.client.post(
        f"/api/v1/checkpoints/{created['id']}/uploads", json=body, headers=sapi.headers
    )
    detail = assert_error(reply, 409, "S3 store")
    root = sapi.env.settings.store_url.removeprefix("file://")
    assert root not in reply.text and "file://" not in reply.text, detail


@pytest.mark.s3
def test_s3_not_found_does_not_name_bucket_or_prefix(s3_api: Api) -> None:
    created = s3_api.register({}, complete=False)
    url = f"/api/v1/checkpoints/{created['id']}/uploads/{created['id']:016x}{'0' * 16}"
    reply = s3_api.client.delete(url, headers=s3_api.headers)
    assert_error(reply, 404, "not found")
    bucket = s3_api.env.settings.store_url.removeprefix("s3://").split("/")[0]
    assert bucket not in reply.text and "s3://" not in reply.text, reply.text


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/checkpoints", "GET, POST"),
        ("OPTIONS", "/api/v1/checkpoints", "GET, POST"),
        ("PUT", "/api/v1/policies/1", "GET, PATCH, DELETE"),
        ("OPTIONS", "/api/v1/checkpoints/1", "GET, DELETE"),
    ],
)
def test_allow_header_lists_every_method_of_the_path(
    sapi: Api, method: str, path: str, allowed: str
) -> None:
    reply = sapi.client.request(method, path, headers=sapi.headers)
    assert reply.status_code == 405, reply.text
    assert set(reply.headers["allow"].split(", ")) == set(allowed.split(", "))
    assert allowed.split(", ")[0] in reply.json()["detail"]["message"]


@pytest.mark.parametrize("value", [0, 1, "true", "yes", None])
def test_policy_enabled_must_be_a_json_boolean(sapi: Api, value: object) -> None:
    body = {"name": "p", "method": "linear", "selector": {}, "enabled": value}
    assert_error(sapi.client.post("/api/v1/policies", json=body, headers=sapi.headers), 422)
    created = sapi.client.post(
        "/api/v1/policies", json={**body, "enabled": False}, headers=sapi.headers
    )
    assert created.status_code == 201 and created.json()["enabled"] is False
    url = f"/api/v1/policies/{created.json()['id']}"
    assert_error(sapi.client.patch(url, json={"enabled": 1}, headers=sapi.headers), 422)
    assert sapi.client.patch(url, json={"enabled": True}, headers=sapi.headers).json()["enabled"]


# ---- 9: the database unreachable --------------------------------------------------------------


def test_database_unreachable_is_503_with_retry_after_and_readyz_reports_it(
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from registry.api.app import create_app
    from registry.settings import Settings
    from tests.services import free_port

    closed = f"postgresql+psycopg://ckreg:secret@127.0.0.1:{free_port()}/ckreg"
    settings = Settings(home=tmp_path, database_url=closed, store_url=f"file://{tmp_path / 's'}")
    with TestClient(create_app(settings)) as client:  # errors would raise in the test
        token = {"Authorization": "Bearer ckr_1_x"}
        for _ in range(2):  # the same keep-alive client, twice
            listed = client.get("/api/v1/checkpoints")
            assert listed.status_code == 503, listed.text
            assert listed.headers["retry-after"] == "5"
            assert listed.json()["detail"]["error"] == "database_unavailable"
            assert "secret" not in listed.text and closed.split("@")[1] not in listed.text
        created = client.post(
            "/api/v1/checkpoints", json={"name": "x", "kind": "base"}, headers=token
        )
        assert created.status_code == 503, created.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"].startswith("error")
        assert ready.json()["store"] == "ok"
        assert client.get("/healthz").status_code == 200


# ---- 3/6: stale pending checkpoints (the service, on both databases) --------------------------


def test_fail_stale_pending_on_both_databases(rapi: Api) -> None:
    from datetime import timedelta

    from sqlalchemy import update
    from sqlmodel import col

    from registry.models import utcnow
    from registry.services.recovery import fail_stale_pending

    old = rapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="old", complete=False)
    fresh = rapi.register(
        {"model.safetensors": st_bytes(tiny_state(1))}, name="new", complete=False
    )
    ready = rapi.register({"model.safetensors": st_bytes(tiny_state(2))}, name="ready")
    past = utcnow() - timedelta(hours=2)
    with rapi.env.session() as session:
        for table, column in ((Checkpoint, Checkpoint.id), (Artifact, Artifact.checkpoint_id)):
            session.execute(
                update(table)
                .where(col(column).in_([old["id"], ready["id"]]))
                .values(created_at=past)
            )
        session.commit()
        failed = fail_stale_pending(session=session, store=rapi.env.store, ttl_s=3600)
    assert failed == [old["id"]]
    assert rapi.env.checkpoint(old["id"]).status == CheckpointStatus.failed
    assert rapi.env.artifact_rows(old["id"]) == []
    assert rapi.env.checkpoint(fresh["id"]).status == CheckpointStatus.pending
    assert rapi.env.checkpoint(ready["id"]).status == CheckpointStatus.ready
    late = rapi.client.post(
        f"/api/v1/checkpoints/{old['id']}/complete", json={}, headers=rapi.headers
    )
    assert_error(late, 409, "failed")
