"""Deletion: refused while a merged descendant depends on the checkpoint, unless forced;
unshared blobs are released to gc, shared ones kept."""

from __future__ import annotations

from registry.models import LineageCreate
from registry.services import add_lineage_edges, collect_garbage
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state


def test_delete_refused_while_merged_descendant_depends(api: Api) -> None:
    base = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    ft = api.register(
        {"model.safetensors": st_bytes(tiny_state(0, scale=1.1))},
        name="ft",
        kind="finetune",
        base_id=base["id"],
    )
    merged = api.register(
        {"model.safetensors": st_bytes(tiny_state(0, scale=1.05))},
        name="merged",
        kind="merged",
        base_id=base["id"],
    )
    with api.env.session() as session:
        add_lineage_edges(
            session=session,
            edges=[LineageCreate(parent_id=ft["id"], child_id=merged["id"], role="input")],
        )
    refused = api.client.delete(f"/api/v1/checkpoints/{ft['id']}", headers=api.headers)
    assert refused.status_code == 409
    assert f"{merged['id']} 'merged'" in refused.json()["detail"]["message"]
    assert api.env.checkpoint(ft["id"]).status == "ready"
    # deleting the merged checkpoint first unblocks its inputs
    assert (
        api.client.delete(f"/api/v1/checkpoints/{merged['id']}", headers=api.headers).json()[
            "status"
        ]
        == "deleted"
    )
    base_blob = api.client.get(f"/api/v1/checkpoints/{base['id']}").json()["files"][0]["sha256"]
    done = api.client.delete(f"/api/v1/checkpoints/{ft['id']}", headers=api.headers)
    assert (
        done.status_code == 200
        and done.json()["status"] == "deleted"
        and done.json()["files"] == []
    )
    # the finetune's weights and task vector are released to gc, which reclaims them; only the
    # base's weights remain
    released = done.json()["metadata"]["deletion"]["released_to_gc"]
    assert len(released) == 2 and f"blobs/sha256/{base_blob}" not in released
    assert set(released) <= set(api.env.blobs()), "released, not deleted inline"
    with api.env.session() as session:
        collect_garbage(
            session=session, store=api.env.store, grace_s=0, upload_ttl_s=0, dry_run=False
        )
    assert api.env.blobs() == [f"blobs/sha256/{base_blob}"]
    assert (
        api.client.get(f"/api/v1/checkpoints/{ft['id']}/files/model.safetensors").status_code == 404
    )
    names = [c["name"] for c in api.client.get("/api/v1/checkpoints").json()["items"]]
    assert names == ["base"]
    lineage = api.client.get(f"/api/v1/checkpoints/{base['id']}/lineage").json()
    assert {e["child_id"] for e in lineage["descendants"]} == {ft["id"], merged["id"]}, (
        "history is kept"
    )


def test_force_delete_and_shared_blobs(api: Api) -> None:
    data = st_bytes(tiny_state(1))
    base = api.register({"model.safetensors": data}, name="base")
    twin = api.register({"model.safetensors": data}, name="twin")
    merged = api.register(
        {"model.safetensors": st_bytes(tiny_state(2))}, name="merged", kind="merged"
    )
    with api.env.session() as session:
        add_lineage_edges(
            session=session,
            edges=[LineageCreate(parent_id=base["id"], child_id=merged["id"], role="base")],
        )
    assert (
        api.client.delete(f"/api/v1/checkpoints/{base['id']}", headers=api.headers).status_code
        == 409
    )
    blobs = api.env.blobs()
    forced = api.client.delete(
        f"/api/v1/checkpoints/{base['id']}", params={"force": True}, headers=api.headers
    )
    assert forced.status_code == 200 and forced.json()["status"] == "deleted"
    assert api.env.blobs() == blobs, "the blob is still used by 'twin'"
    got = api.client.get(f"/api/v1/checkpoints/{twin['id']}/files/model.safetensors")
    assert got.content == data
    again = api.client.delete(f"/api/v1/checkpoints/{base['id']}", headers=api.headers)
    assert again.status_code == 200, "deleting twice is a no-op"
