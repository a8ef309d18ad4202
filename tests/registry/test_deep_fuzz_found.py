"""Regressions for what the deep fuzzing (``test_schemathesis_deep``) found, outside mergekit
YAML (whose seeded bad YAMLs are there): a 416 outside the error shape, answers the OpenAPI did
not document, and a mergekit ``parameters`` list that crashed the config parser."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from mergeops.mergekit.schema import parse
from mergeops.methods.base import MergeError
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, st_bytes, tiny_state

PART = b"presigned!"


def test_an_unsatisfiable_range_is_a_416_in_the_error_shape(api: Api) -> None:
    data = st_bytes(tiny_state(0))
    checkpoint = api.register({"model.safetensors": data})
    url = f"/api/v1/checkpoints/{checkpoint['id']}/files/model.safetensors"
    refused = api.client.get(url, headers={**api.headers, "Range": "bytes=99999999-"})
    assert refused.status_code == 416
    assert refused.headers["content-range"] == f"bytes */{len(data)}"
    detail = refused.json()["detail"]
    assert detail["error"] == "range_not_satisfiable"
    assert "model.safetensors" in detail["message"] and str(len(data)) in detail["message"]


def _documented(api: Api, path: str, method: str) -> dict[str, Any]:
    schema = api.client.get("/api/v1/openapi.json").json()
    return dict(schema["paths"][path][method]["responses"])


def test_every_answer_of_merges_and_policy_runs_is_documented(api: Api) -> None:
    base = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="b")["id"]
    ft = {"model.safetensors": st_bytes(tiny_state(1))}
    fts = [api.register(ft, name="f", kind="finetune", base_id=base)["id"]]
    body = {"method": "task_arithmetic", "base_id": base, "inputs": [{"checkpoint_id": fts[0]}]}
    codes = [api.client.post("/api/v1/merges", json=body, headers=api.headers).status_code]
    codes.append(api.client.post("/api/v1/merges", json=body, headers=api.headers).status_code)
    assert codes == [202, 200]  # a new run, then the same run reused
    assert {"200", "202"} <= _documented(api, "/api/v1/merges", "post").keys()
    policy = {"name": "p", "method": "task_arithmetic", "selector": {"base_id": base}}
    created = api.client.post("/api/v1/policies", json=policy, headers=api.headers).json()
    ran = api.client.post(f"/api/v1/policies/{created['id']}/run", headers=api.headers)
    documented = _documented(api, "/api/v1/policies/{policy_id}/run", "post")
    assert {"200", "202"} <= documented.keys() and str(ran.status_code) in documented


@pytest.mark.parametrize("parameters", [[1, 2], "x", 5])
def test_mergekit_parameters_that_are_not_a_mapping_are_a_merge_error(parameters: Any) -> None:
    config = {"merge_method": "linear", "models": ["a", "b"], "parameters": parameters}
    with pytest.raises(MergeError, match=r"parameters.*mapping"):
        parse(config)
    config = {"merge_method": "linear", "models": [{"model": "a", "parameters": parameters}]}
    with pytest.raises(MergeError, match=r"models\.0\.parameters.*mapping"):
        parse(config)


def test_a_part_etag_with_a_control_character_is_a_422_and_the_upload_stays_open(
    s3_api: Api,
) -> None:
    """moto answered CompleteMultipartUpload with such an ETag with a 500 (after 5 retries),
    which the registry passed on as its own 500."""
    checkpoint = s3_api.register({"model.safetensors": st_bytes(tiny_state(0))}, complete=False)
    uploads = f"/api/v1/checkpoints/{checkpoint['id']}/uploads"
    body = {"name": "extra.bin", "size": len(PART), "sha256": hashlib.sha256(PART).hexdigest()}
    plan = s3_api.client.post(uploads, json=body, headers=s3_api.headers).json()
    sent = httpx.put(plan["parts"][0]["url"], content=PART, timeout=30)
    complete = f"{uploads}/{plan['upload_id']}/complete"
    for etag in ("\x01", '"abc"\x7f', "a<b&c", "é", ""):
        parts = {"parts": [{"part_number": 1, "etag": etag}]}
        refused = s3_api.client.post(complete, json=parts, headers=s3_api.headers)
        assert refused.status_code == 422, (etag, refused.text)
        assert "parts.0.etag" in refused.json()["detail"]["message"]
    parts = {"parts": [{"part_number": 1, "etag": sent.headers["ETag"]}]}
    done = s3_api.client.post(complete, json=parts, headers=s3_api.headers)
    assert done.status_code == 200, done.text
