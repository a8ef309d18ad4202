"""Upload paths beyond the basics: concurrent identical uploads store one blob; the full
upload/complete/download path over a real S3 endpoint (moto_server over HTTP)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest

from registry.services import collect_garbage
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state


def test_concurrent_identical_uploads_store_once(api: Api) -> None:
    data = st_bytes(tiny_state(0))
    ids = [api.register({}, name=f"c{i}", complete=False)["id"] for i in range(6)]

    def upload(checkpoint_id: int) -> dict:
        put = api.client.put(
            f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors",
            content=data,
            headers=api.headers,
        )
        assert put.status_code == 200, put.text
        done = api.client.post(f"/api/v1/checkpoints/{checkpoint_id}/complete", headers=api.headers)
        assert done.status_code == 200, done.text
        return put.json()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(upload, ids))
    assert api.env.blobs() == [f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"]
    assert sum(not r["deduplicated"] for r in results) <= 1
    assert all(api.env.checkpoint(i).status == "ready" for i in ids)


@pytest.mark.s3
def test_upload_complete_download_over_s3(s3_api: Api) -> None:
    base_bytes = st_bytes(tiny_state(0))
    base = s3_api.register({"model.safetensors": base_bytes}, name="base")
    ft = s3_api.register(
        {"model.safetensors": st_bytes(tiny_state(1))},
        name="ft",
        kind="finetune",
        base_id=base["id"],
    )
    assert ft["status"] == "ready"
    got = s3_api.client.get(f"/api/v1/checkpoints/{base['id']}/files/model.safetensors")
    assert got.status_code == 200 and got.content == base_bytes
    roles = [
        a["role"] for a in s3_api.client.get(f"/api/v1/checkpoints/{ft['id']}/artifacts").json()
    ]
    assert roles == ["task_vector"], "task vector computed from range reads over S3"
    bad = s3_api.register({"model.safetensors": base_bytes[:30]}, name="bad", complete=False)
    blobs = s3_api.env.blobs()
    done = s3_api.client.post(f"/api/v1/checkpoints/{bad['id']}/complete", headers=s3_api.headers)
    assert done.status_code == 422
    with s3_api.env.session() as session:  # its blob was released to gc, which reclaims it
        collect_garbage(
            session=session, store=s3_api.env.store, grace_s=0, upload_ttl_s=0, dry_run=False
        )
    assert len(s3_api.env.blobs()) == len(blobs) - 1, "the failed upload's blob is removed from S3"
    assert s3_api.client.get("/api/v1/readyz").json()["store"] == "ok"
