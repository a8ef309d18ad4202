"""The REST flow end to end: create -> upload -> complete -> list/get/download, on SQLite and
PostgreSQL, with a real file store."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load

from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state


def test_single_file_round_trip(api: Api) -> None:
    data = st_bytes(tiny_state(0))
    body = api.register(
        {"model.safetensors": data}, name="base-a", tags=["x", "y"], metadata={"lr": 0.1}
    )
    assert body["status"] == "ready"
    assert body["total_bytes"] == len(data)
    assert body["tags"] == ["x", "y"] and body["metadata"] == {"lr": 0.1}
    assert body["files"] == [
        {
            "name": "model.safetensors",
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
            "role": "weights",
            "deduplicated": False,
            "codec": "raw",  # under 64 KiB: not worth compressing
            "stored_size": len(data),
        }
    ]
    assert api.env.launcher.ready == [body["id"]]
    got = api.client.get(f"/api/v1/checkpoints/{body['id']}/files/model.safetensors")
    assert got.status_code == 200 and got.content == data
    assert got.headers["x-content-sha256"] == hashlib.sha256(data).hexdigest()
    assert api.client.get(f"/api/v1/checkpoints/{body['id']}").json()["status"] == "ready"


def test_declared_sha_on_put_and_complete(api: Api) -> None:
    data = st_bytes(tiny_state(1))
    digest = hashlib.sha256(data).hexdigest()
    created = api.client.post(
        "/api/v1/checkpoints", json={"name": "m", "kind": "base"}, headers=api.headers
    ).json()
    url = f"/api/v1/checkpoints/{created['id']}"
    put = api.client.put(
        f"{url}/files/model.safetensors",
        content=data,
        headers={**api.headers, "X-Content-SHA256": digest},
    )
    assert put.status_code == 200
    done = api.client.post(
        f"{url}/complete", json={"sha256": {"model.safetensors": digest}}, headers=api.headers
    )
    assert done.status_code == 200 and done.json()["status"] == "ready"
    again = api.client.post(f"{url}/complete", headers=api.headers)
    assert again.status_code == 200, "completing a ready checkpoint again is a no-op"
    late = api.client.put(f"{url}/files/extra.json", content=b"{}", headers=api.headers)
    assert late.status_code == 409 and "pending" in late.json()["detail"]["message"]


def test_sharded_and_adapter_layouts(api: Api) -> None:
    state = tiny_state(2)
    shard1 = st_bytes({k: v for k, v in state.items() if k.startswith("layers.0")})
    shard2 = st_bytes({k: v for k, v in state.items() if k.startswith("layers.1")})
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {k: names[0] if k.startswith("layers.0") else names[1] for k in state},
    }
    files = {
        names[0]: shard1,
        names[1]: shard2,
        "model.safetensors.index.json": json.dumps(index).encode(),
    }
    base = api.register(files, name="sharded")
    assert base["status"] == "ready" and len(base["files"]) == 3
    roles = {f["name"]: f["role"] for f in base["files"]}
    assert roles["model.safetensors.index.json"] == "config"
    lora = {
        "base_model.model.layers.0.lora_A.weight": torch.randn(2, 4),
        "base_model.model.layers.0.lora_B.weight": torch.randn(8, 2),
    }
    adapter_files = {
        "adapter_config.json": json.dumps({"r": 2, "target_modules": ["layers.0"]}).encode(),
        "adapter_model.safetensors": st_bytes(lora),
    }
    adapter = api.register(adapter_files, name="lora", kind="adapter", base_id=base["id"])
    assert adapter["status"] == "ready"
    got = load(
        api.client.get(
            f"/api/v1/checkpoints/{adapter['id']}/files/adapter_model.safetensors"
        ).content
    )
    assert torch.equal(
        got["base_model.model.layers.0.lora_A.weight"],
        lora["base_model.model.layers.0.lora_A.weight"],
    )


def test_identical_content_is_deduplicated(api: Api) -> None:
    data = st_bytes(tiny_state(3))
    api.register({"model.safetensors": data}, name="first")
    blobs = api.env.blobs()
    second = api.client.post(
        "/api/v1/checkpoints", json={"name": "second", "kind": "base"}, headers=api.headers
    ).json()
    put = api.client.put(
        f"/api/v1/checkpoints/{second['id']}/files/model.safetensors",
        content=data,
        headers=api.headers,
    )
    assert put.json()["deduplicated"] is True
    done = api.client.post(f"/api/v1/checkpoints/{second['id']}/complete", headers=api.headers)
    assert done.json()["status"] == "ready"
    assert api.env.blobs() == blobs, "identical content stores no new bytes"


def test_register_by_reference(api: Api) -> None:
    data = st_bytes(tiny_state(4))
    digest = hashlib.sha256(data).hexdigest()
    api.env.store.put_bytes(data)
    created = api.client.post(
        "/api/v1/checkpoints", json={"name": "ref", "kind": "base"}, headers=api.headers
    ).json()
    url = f"/api/v1/checkpoints/{created['id']}"
    missing = api.client.post(
        f"{url}/files:by-reference",
        json={"name": "model.safetensors", "sha256": "0" * 64},
        headers=api.headers,
    )
    assert missing.status_code == 404 and "not in the store" in missing.json()["detail"]["message"]
    ok = api.client.post(
        f"{url}/files:by-reference",
        json={"name": "model.safetensors", "sha256": digest},
        headers=api.headers,
    )
    assert ok.status_code == 200 and ok.json()["size"] == len(data)
    assert api.client.post(f"{url}/complete", headers=api.headers).json()["status"] == "ready"


def test_list_filters_and_pagination(api: Api) -> None:
    base = api.register({"model.safetensors": st_bytes(tiny_state(5))}, name="base")
    for i, task in enumerate(["math", "code", "math"]):
        state = {k: v + 0.01 * (i + 1) for k, v in tiny_state(5).items()}
        api.register(
            {"model.safetensors": st_bytes(state)},
            name=f"ft{i}",
            kind="finetune",
            base_id=base["id"],
            task=task,
            run="r1",
            step=i,
            tags=[task],
        )
    api.register({"model.safetensors": st_bytes(tiny_state(6))}, name="pending", complete=False)

    def ids(**params: object) -> list[str]:
        page = api.client.get("/api/v1/checkpoints", params=params).json()
        return [item["name"] for item in page["items"]]

    assert ids(task="math") == ["ft2", "ft0"]
    assert ids(tag="code") == ["ft1"]
    assert ids(kind="finetune", base_id=base["id"], run="r1") == ["ft2", "ft1", "ft0"]
    assert ids(status="pending") == ["pending"]
    page = api.client.get("/api/v1/checkpoints", params={"limit": 2, "offset": 1}).json()
    assert (
        page["total"] == 5
        and page["limit"] == 2
        and [i["name"] for i in page["items"]] == ["ft2", "ft1"]
    )
    assert api.client.get("/api/v1/checkpoints", params={"limit": 0}).status_code == 422
    assert api.client.get("/api/v1/checkpoints/999999").status_code == 404


def test_health_and_openapi(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/api/v1/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok"
    assert "/api/v1/checkpoints" in api.client.get("/api/v1/openapi.json").json()["paths"]
