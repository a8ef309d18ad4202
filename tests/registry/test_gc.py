"""Garbage collection: dry runs, the grace period, expired uploads, shared and codec-referenced
blobs, the admin route and ``ckreg gc``."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from registry.models import CheckpointCreate
from registry.services import (
    collect_garbage,
    create_token,
    delete_checkpoint_report,
    register_directory,
)
from registry.services.presigned import start_presigned_upload
from registry.settings import get_settings
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, Env, st_bytes, tiny_state

HOUR = 3600.0


def _gc(env: Env, **options: object):  # type: ignore[no-untyped-def]
    settings = {"grace_s": HOUR, "upload_ttl_s": 24 * HOUR, "dry_run": False, **options}
    with env.session() as session:
        return collect_garbage(session=session, store=env.store, **settings)  # type: ignore[arg-type]


def _age(env: Env, key: str, seconds: float) -> None:
    """Backdate a file-store blob's mtime (S3 cannot: tests there use ``now``)."""
    path = env.store.local_path(key)
    assert path is not None
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_dry_run_deletes_nothing_and_reports_bytes(api: Api) -> None:
    kept = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="kept")
    orphans = [api.env.store.put_bytes(os.urandom(100 + i)) for i in range(3)]
    for info in orphans:
        _age(api.env, info.key, 2 * HOUR)
    before = api.env.blobs()
    report = _gc(api.env, dry_run=True)
    assert api.env.blobs() == before, "a dry run deletes nothing"
    assert sorted(i.key for i in report.orphans) == sorted(i.key for i in orphans)
    assert report.orphan_bytes == 100 + 101 + 102 and report.deleted == []
    assert report.scanned == len(before) and report.referenced == 1
    done = _gc(api.env)
    assert sorted(done.deleted) == sorted(i.key for i in orphans)
    assert done.deleted_bytes == 303
    assert api.env.blobs() == [f"blobs/sha256/{kept['files'][0]['sha256']}"]


def test_grace_period_is_respected(api: Api) -> None:
    young = api.env.store.put_bytes(b"written a moment ago")
    old = api.env.store.put_bytes(b"written long ago")
    _age(api.env, old.key, HOUR + 60)
    report = _gc(api.env)
    assert report.deleted == [old.key] and report.young == 1
    assert api.env.store.exists(young.key)
    later = _gc(api.env, now=datetime.now(UTC) + timedelta(seconds=HOUR + 60))
    assert later.deleted == [young.key]


def test_expired_presigned_uploads_are_aborted(s3_api: Api) -> None:
    env = s3_api.env
    checkpoint = s3_api.register({}, name="pending", complete=False)
    with env.session() as session:
        plan = start_presigned_upload(
            session=session,
            store=env.store,
            checkpoint_id=checkpoint["id"],
            name="big.safetensors",
            size=10,
            sha256="0" * 64,
        )
    # the client has sent a part: the upload is active now (moto reports a fixed 'Initiated')
    assert httpx.put(plan.urls[0], content=b"0123456789").status_code == 200
    env.store.client.put_object(  # type: ignore[attr-defined]
        Bucket=env.store.bucket,  # type: ignore[attr-defined]
        Key=env.store._full("tmp/" + "a" * 32),  # type: ignore[attr-defined]
        Body=b"completed, never adopted",
    )
    fresh = _gc(env)
    assert fresh.stale_uploads == [] and fresh.stale_temps == []
    assert [u.key for u in env.store.open_uploads()] == [plan.temp_key]
    dry = _gc(env, dry_run=True, now=datetime.now(UTC) + timedelta(days=2))
    assert [u.key for u in dry.stale_uploads] == [plan.temp_key]
    assert list(env.store.open_uploads()), "a dry run aborts nothing"
    expired = _gc(env, now=datetime.now(UTC) + timedelta(days=2))
    assert [u.key for u in expired.stale_uploads] == [plan.temp_key]
    assert [i.key for i in expired.stale_temps] == ["tmp/" + "a" * 32]
    assert list(env.store.open_uploads()) == [] and list(env.store.list("tmp/")) == []


def test_deleting_a_checkpoint_keeps_a_blob_another_one_shares(api: Api) -> None:
    data = st_bytes(tiny_state(3))
    first = api.register({"model.safetensors": data}, name="first")
    twin = api.register({"model.safetensors": data}, name="twin")
    key = f"blobs/sha256/{first['files'][0]['sha256']}"
    with api.env.session() as session:
        report = delete_checkpoint_report(
            session=session, store=api.env.store, checkpoint_id=first["id"]
        )
    assert report.released == [] and report.kept_shared == [key]
    assert report.checkpoint.meta["deletion"]["kept_shared"] == [key]
    _age(api.env, key, 2 * HOUR)
    assert _gc(api.env).deleted == []
    got = api.client.get(f"/api/v1/checkpoints/{twin['id']}/files/model.safetensors")
    assert got.status_code == 200 and got.content == data


def test_blobs_a_codec_decodes_against_outlive_their_checkpoint(api: Api) -> None:
    base = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    ft = api.register({"model.safetensors": st_bytes(tiny_state(1))}, name="ft")
    base_sha = base["files"][0]["sha256"]
    with api.env.session() as session:  # pretend ft is stored as a delta against base
        row = api.env.artifact_rows(ft["id"])[0]
        row.codec, row.codec_base_sha256 = "delta-test", base_sha
        session.add(row)
        session.commit()
        report = delete_checkpoint_report(
            session=session, store=api.env.store, checkpoint_id=base["id"], force=True
        )
    assert report.kept_as_codec_ref == ["model.safetensors"] and report.released == []
    for key in api.env.blobs():
        _age(api.env, key, 2 * HOUR)
    assert _gc(api.env).deleted == [], "ft decodes against base's blob"
    with api.env.session() as session:
        delete_checkpoint_report(session=session, store=api.env.store, checkpoint_id=ft["id"])
    last = _gc(api.env)
    assert last.pruned_rows == 1 and f"blobs/sha256/{base_sha}" in last.deleted
    assert api.env.blobs() == [] and api.env.artifact_rows() == []


def test_admin_route_needs_the_admin_scope(api: Api) -> None:
    orphan = api.env.store.put_bytes(b"an orphan")
    _age(api.env, orphan.key, 2 * HOUR)
    url = "/api/v1/admin/gc"
    assert api.client.post(url).status_code == 401
    refused = api.client.post(url, headers=api.headers)
    assert refused.status_code == 403 and "admin" in refused.json()["detail"]["message"]
    with api.env.session() as session:
        _, secret = create_token(session=session, name="admin", scopes=["admin"])
    admin = {"Authorization": f"Bearer {secret}"}
    dry = api.client.post(url, headers=admin)
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] and dry.json()["orphan_bytes"] == len(b"an orphan")
    assert api.env.store.exists(orphan.key)
    bad = api.client.post(url, json={"grace_s": -1}, headers=admin)
    assert bad.status_code == 422 and "grace_s" in bad.json()["detail"]["message"]
    done = api.client.post(url, json={"dry_run": False}, headers=admin).json()
    assert done["deleted_count"] == 1 and done["deleted_bytes"] == len(b"an orphan")
    assert not api.env.store.exists(orphan.key)


def _folder(tmp_path: Path, data: bytes) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(data)
    return folder


def test_cli_gc_and_delete(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from flows.cli import app

    orphan = env.store.put_bytes(b"x" * 2048)
    _age(env, orphan.key, 2 * HOUR)
    monkeypatch.setenv("CKREG_DATABASE_URL", env.settings.database_url)
    monkeypatch.setenv("CKREG_STORE_URL", env.settings.store_url)
    get_settings.cache_clear()
    try:
        dry = CliRunner().invoke(app, ["gc", "-q"])
        assert dry.exit_code == 0, dry.output
        assert "would delete 1 orphan blobs, 2.0 KiB" in dry.output and orphan.key in dry.output
        assert env.store.exists(orphan.key)
        done = CliRunner().invoke(app, ["gc", "--delete", "-q"])
        assert done.exit_code == 0 and "deleted 1 orphan blobs, 2.0 KiB" in done.output
        assert not env.store.exists(orphan.key)
        with env.session() as session:
            checkpoint = register_directory(
                session=session,
                store=env.store,
                settings=env.settings,
                data=CheckpointCreate(name="gone", kind="base"),
                directory=_folder(tmp_path, st_bytes(tiny_state(4))),
            )
        deleted = CliRunner().invoke(app, ["delete", str(checkpoint.id)])
        assert deleted.exit_code == 0, deleted.output
        assert env.artifact_rows() == []
        assert f"checkpoint {checkpoint.id} 'gone' is deleted" in deleted.output
        assert "released to gc" in deleted.output and "blobs/sha256/" in deleted.output
        missing = CliRunner().invoke(app, ["delete", "999"])
        assert missing.exit_code == 1 and "checkpoint 999 not found" in missing.output
    finally:
        get_settings.cache_clear()


def test_delete_refused_while_an_unfinished_merge_run_uses_it(api: Api) -> None:
    from registry.services import merge_runs as run_service

    base = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    ft = api.register({"model.safetensors": st_bytes(tiny_state(1))}, name="ft")
    request = run_service.MergeRequest(
        method="task_arithmetic",
        base_id=base["id"],
        inputs=[run_service.MergeInputSpec(checkpoint_id=ft["id"])],
    )
    with api.env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    refused = api.client.delete(f"/api/v1/checkpoints/{ft['id']}", headers=api.headers)
    assert refused.status_code == 409
    assert f"unfinished merge run(s) [{run.id}]" in refused.json()["detail"]["message"]
    forced = api.client.delete(
        f"/api/v1/checkpoints/{ft['id']}", params={"force": True}, headers=api.headers
    )
    assert forced.status_code == 200 and forced.json()["status"] == "deleted"
    assert forced.json()["metadata"]["deletion"]["released_bytes"] > 0
