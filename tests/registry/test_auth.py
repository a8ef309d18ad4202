"""Bearer tokens: hashed at rest, scopes enforced on writes (and on reads when configured)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import select

from registry.errors import Forbidden, InvalidInput, Unauthenticated
from registry.models import ApiToken, TokenScope
from registry.services import authenticate, create_token, revoke_token
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, Env, build_api, make_env


def test_tokens_are_stored_hashed_and_checked(env: Env) -> None:
    with env.session() as session:
        token, plaintext = create_token(session=session, name="ci", scopes=["write"])
        prefix, token_id, secret = plaintext.split("_", 2)
        assert prefix == "ckr" and int(token_id) == token.id
        rows = session.exec(select(ApiToken)).all()
        assert all(secret not in (row.token_hash, row.name) for row in rows)
        assert (
            authenticate(session=session, plaintext=plaintext, required=TokenScope.read).id
            == token.id
        )
        with pytest.raises(Forbidden, match="needs 'admin'"):
            authenticate(session=session, plaintext=plaintext, required=TokenScope.admin)
        with pytest.raises(Unauthenticated):
            authenticate(session=session, plaintext=plaintext[:-2] + "xx", required=TokenScope.read)
        with pytest.raises(InvalidInput, match="choose from"):
            create_token(session=session, name="bad", scopes=["root"])
        revoke_token(session=session, token_id=token.id or 0)
        with pytest.raises(Unauthenticated, match="revoked"):
            authenticate(session=session, plaintext=plaintext, required=TokenScope.read)


def test_writes_need_a_write_token(api: Api) -> None:
    body = {"name": "m", "kind": "base"}
    missing = api.client.post("/api/v1/checkpoints", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["detail"]["error"] == "unauthenticated"
    bogus = api.client.post(
        "/api/v1/checkpoints", json=body, headers={"Authorization": "Bearer ckr_1_nope"}
    )
    assert bogus.status_code == 401
    read_only = api.client.post("/api/v1/checkpoints", json=body, headers=api.read_headers)
    assert read_only.status_code == 403 and "needs 'write'" in read_only.json()["detail"]["message"]
    created = api.client.post("/api/v1/checkpoints", json=body, headers=api.headers)
    assert created.status_code == 201
    cid = created.json()["id"]
    for method, url in [
        ("PUT", f"/api/v1/checkpoints/{cid}/files/model.safetensors"),
        ("POST", f"/api/v1/checkpoints/{cid}/complete"),
        ("POST", f"/api/v1/checkpoints/{cid}/metrics"),
        ("POST", f"/api/v1/checkpoints/{cid}/artifacts?role=mask"),
        ("POST", f"/api/v1/checkpoints/{cid}/task-vector"),
        ("DELETE", f"/api/v1/checkpoints/{cid}"),
    ]:
        assert api.client.request(method, url, content=b"x").status_code == 401, url
        assert (
            api.client.request(method, url, content=b"x", headers=api.read_headers).status_code
            == 403
        ), url
    assert api.client.get(f"/api/v1/checkpoints/{cid}").status_code == 200, (
        "reads are open by default"
    )


@pytest.fixture
def locked_api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    environment = make_env(database_url, tmp_path, auth_reads=True)
    yield from build_api(environment)
    environment.engine.dispose()


def test_reads_need_a_token_when_configured(locked_api: Api) -> None:
    assert locked_api.client.get("/api/v1/checkpoints").status_code == 401
    assert (
        locked_api.client.get("/api/v1/checkpoints", headers=locked_api.read_headers).status_code
        == 200
    )
    assert (
        locked_api.client.get("/api/v1/checkpoints", headers=locked_api.headers).status_code == 200
    )
    assert locked_api.client.get("/healthz").status_code == 200
