"""Artifacts (second moments, masks, merge state) and metrics through the API."""

from __future__ import annotations

import torch
from safetensors.torch import load

from registry.services import collect_garbage
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state


def test_artifact_upload_validation_and_download(api: Api) -> None:
    ckpt = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="c")
    url = f"/api/v1/checkpoints/{ckpt['id']}/artifacts"
    moments = {k: v.abs() for k, v in tiny_state(1).items()}
    data = st_bytes(moments)
    created = api.client.post(
        url,
        params={"role": "second_moment", "name": "exp_avg_sq.safetensors"},
        content=data,
        headers=api.headers,
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert (
        body["role"] == "second_moment"
        and body["tensors"] == 4
        and body["name"] == "exp_avg_sq.safetensors"
    )
    got = api.client.get(f"{url}/{body['id']}/content")
    assert torch.equal(load(got.content)["layers.0.weight"], moments["layers.0.weight"])
    blobs = api.env.blobs()
    wrong = st_bytes({"layers.0.weight": torch.zeros(3, 3)})
    bad = api.client.post(url, params={"role": "fisher"}, content=wrong, headers=api.headers)
    assert bad.status_code == 422
    assert (
        "'layers.0.weight'" in bad.json()["detail"]["message"]
        and "fisher.safetensors" in bad.json()["detail"]["message"]
    )
    with api.env.session() as session:  # its blob was released to gc, which reclaims it
        collect_garbage(
            session=session, store=api.env.store, grace_s=0, upload_ttl_s=0, dry_run=False
        )
    assert api.env.blobs() == blobs, "a rejected artifact leaves no blob"
    state = api.client.post(
        url,
        params={"role": "merge_state"},
        content=st_bytes({"anything": torch.ones(2)}),
        headers=api.headers,
    )
    assert state.status_code == 201
    roles = [a["role"] for a in api.client.get(url).json()]
    assert roles == ["second_moment", "merge_state"]
    assert (
        api.client.post(
            url, params={"role": "weights"}, content=data, headers=api.headers
        ).status_code
        == 422
    )
    assert (
        api.client.post(url, params={"role": "nope"}, content=data, headers=api.headers).status_code
        == 422
    )
    assert api.client.get(f"{url}/999999").status_code == 404


def test_metrics(api: Api) -> None:
    ckpt = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="c")
    url = f"/api/v1/checkpoints/{ckpt['id']}/metrics"
    payload = [
        {"name": "loss", "value": 0.5, "step": 10},
        {
            "name": "accuracy",
            "value": 0.9,
            "dataset": "digits",
            "split": "test",
            "source": "evaluation",
        },
    ]
    created = api.client.post(url, json=payload, headers=api.headers)
    assert created.status_code == 201
    listed = api.client.get(url).json()
    assert [(m["name"], m["value"], m["source"]) for m in listed] == [
        ("loss", 0.5, "client"),
        ("accuracy", 0.9, "evaluation"),
    ]
    assert listed[1]["dataset"] == "digits" and listed[0]["checkpoint_id"] == ckpt["id"]
    assert [m["name"] for m in api.client.get(url, params={"name": "loss"}).json()] == ["loss"]
    bad = api.client.post(url, json=[{"name": "loss"}], headers=api.headers)
    assert bad.status_code == 422 and "value" in bad.json()["detail"]["message"]
    assert (
        api.client.post(
            "/api/v1/checkpoints/999999/metrics", json=payload, headers=api.headers
        ).status_code
        == 404
    )
