"""Issue 9 regressions: every bad input gets a 4xx in the documented error shape and leaves nothing
behind (non-finite numbers, integers past 64 bits, NaN echoed by the validation handler, presigned
completion on a file store, dtype drift from the base, body/metadata limits, nesting, NUL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import select

from registry.models import Checkpoint, MergePolicy, MergeRun, Metric
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Api, build_api, make_env, st_bytes, tiny_state

BIG = 2**63


@pytest.fixture
def hapi(database_url: str, tmp_path: Path) -> Iterator[Api]:
    environment = make_env(
        database_url,
        tmp_path,
        task_vectors_on_complete=False,
        max_json_body_bytes=64 * 1024,
        max_metadata_bytes=1024,
    )
    yield from build_api(environment)


def raw_post(api: Api, path: str, body: str | bytes) -> Any:
    headers = {**api.headers, "Content-Type": "application/json"}
    return api.client.post(f"/api/v1{path}", content=body, headers=headers)


def assert_error(response: Any, status: int, *words: str) -> dict[str, Any]:
    """The documented shape: ``{"detail": {"error": ..., "message": ...}}`` naming ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, dict) and {"error", "message"} <= detail.keys(), detail
    for word in words:
        assert word in detail["message"], (word, detail["message"])
    return detail


def count(api: Api, table: type) -> int:
    with api.env.session() as session:
        return len(session.exec(select(table)).all())


def ready_pair(api: Api) -> tuple[int, int]:
    base = api.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    ft = api.register(
        {"model.safetensors": st_bytes(tiny_state(1))},
        name="ft",
        kind="finetune",
        base_id=base["id"],
    )
    return base["id"], ft["id"]


# ---- 1 and 3: non-finite numbers ---------------------------------------------------------------


def test_merge_weight_infinity_is_refused_and_nothing_is_created(hapi: Api) -> None:
    base_id, ft_id = ready_pair(hapi)
    inputs = f'[{{"checkpoint_id": {ft_id}, "weight": 1e309}}]'
    body = f'{{"method": "task_arithmetic", "base_id": {base_id}, "inputs": {inputs}}}'
    detail = assert_error(raw_post(hapi, "/merges", body), 422, "body.inputs.0.weight", "finite")
    assert detail["error"] == "invalid_number"
    nan_body = body.replace("1e309", "NaN")
    assert_error(raw_post(hapi, "/merges", nan_body), 422, "NaN", "finite")
    assert count(hapi, MergeRun) == 0
    assert count(hapi, Checkpoint) == 2


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/checkpoints", '{"name": "x", "kind": "base", "step": NaN}', "body.step"),
        ("/checkpoints", '{"name": "x", "kind": "base", "metadata": {"lr": 1e309}}', "lr"),
        ("/checkpoints", '{"name": "x", "kind": "base", "metadata": {"a": [-Infinity]}}', "a.0"),
        (
            "/policies",
            '{"name": "p", "method": "ties", "params": {"k": NaN}, "selector": {}}',
            "body.params.k",
        ),
    ],
)
def test_non_finite_numbers_in_bodies_are_422(hapi: Api, path: str, body: str, field: str) -> None:
    assert_error(raw_post(hapi, path, body), 422, field)
    assert count(hapi, Checkpoint) == 0 and count(hapi, MergePolicy) == 0


def test_non_finite_metric_is_422(hapi: Api) -> None:
    created = hapi.register({}, complete=False)
    body = '[{"name": "loss", "value": Infinity}]'
    assert_error(raw_post(hapi, f"/checkpoints/{created['id']}/metrics", body), 422, "value")
    assert count(hapi, Metric) == 0


def test_validation_handler_survives_non_finite_input(hapi: Api) -> None:
    """Past the body guard, a pydantic error whose input is NaN is still valid JSON."""
    from fastapi.exceptions import RequestValidationError

    from registry.api.errors import handle_request_validation

    error = {"loc": ("body", "step"), "msg": "bad", "type": "int_parsing", "input": float("nan")}
    response = pytest.importorskip("asyncio").run(
        handle_request_validation(None, RequestValidationError([error]))  # type: ignore[arg-type]
    )
    assert response.status_code == 422
    assert json.loads(response.body)["detail"]["errors"][0]["input"] == "nan"


# ---- 2: integers past 64 bits ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/checkpoints/{BIG}",
        f"/checkpoints/{-BIG - 1}/files/model.safetensors",
        f"/checkpoints?offset={BIG}",
        f"/checkpoints?base_id={2**64}",
        f"/merges/{BIG}",
        f"/merges?policy_id={BIG}",
        f"/policies/{BIG}",
        f"/checkpoints/{BIG}/artifacts/{BIG}",
        f"/checkpoints/1/lineage?depth={BIG}",
    ],
)
def test_huge_integers_in_path_and_query_are_422(hapi: Api, path: str) -> None:
    assert_error(hapi.client.get(f"/api/v1{path}", headers=hapi.headers), 422)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/checkpoints", {"name": "x", "kind": "finetune", "base_id": BIG}),
        ("/checkpoints", {"name": "x", "kind": "base", "step": BIG}),
        ("/checkpoints", {"name": "x", "kind": "base", "step": 2**31}),  # INTEGER on PostgreSQL
        ("/checkpoints", {"name": "x", "kind": "base", "metadata": {"n": 2**70}}),
        ("/merges", {"method": "linear", "inputs": [{"checkpoint_id": BIG}]}),
        ("/policies", {"name": "p", "method": "ties", "selector": {"base_id": 2**70}}),
    ],
)
def test_huge_integers_in_bodies_are_422(hapi: Api, path: str, body: dict[str, Any]) -> None:
    assert_error(raw_post(hapi, path, json.dumps(body)), 422)
    assert count(hapi, Checkpoint) == 0 and count(hapi, MergeRun) == 0


def test_huge_integer_in_a_metric_step_and_upload_size(hapi: Api) -> None:
    created = hapi.register({}, complete=False)
    metric = json.dumps([{"name": "loss", "value": 1.0, "step": BIG}])
    assert_error(raw_post(hapi, f"/checkpoints/{created['id']}/metrics", metric), 422, "step")
    upload = json.dumps({"name": "m.safetensors", "size": BIG, "sha256": "0" * 64})
    assert_error(raw_post(hapi, f"/checkpoints/{created['id']}/uploads", upload), 422)


# ---- 4: presigned completion on a file store ---------------------------------------------------


def test_presigned_complete_on_file_store_is_409(hapi: Api) -> None:
    created = hapi.register({}, complete=False)
    body = json.dumps({"parts": [{"part_number": 1, "etag": "x"}]})
    response = raw_post(hapi, f"/checkpoints/{created['id']}/uploads/abc/complete", body)
    assert assert_error(response, 409)["error"] == "presigned_unsupported"


# ---- 6: dtype drift from the base --------------------------------------------------------------


def test_finetune_with_another_dtype_than_its_base_is_refused(hapi: Api) -> None:
    base = hapi.register({"model.safetensors": st_bytes(tiny_state(0))}, name="base")
    ft = hapi.register(
        {"model.safetensors": st_bytes(tiny_state(1, dtype=torch.float16))},
        name="ft16",
        kind="finetune",
        base_id=base["id"],
        complete=False,
    )
    done = hapi.client.post(
        f"/api/v1/checkpoints/{ft['id']}/complete", json={}, headers=hapi.headers
    )
    detail = assert_error(done, 409, "dtype F16 vs base F32", "layers.")
    assert detail["error"] == "base_mismatch" and detail["tensor"].startswith("layers.")
    assert hapi.env.checkpoint(ft["id"]).status == "failed"


# ---- 7: limits, nesting, NUL, dedup flag, pending base, OpenAPI --------------------------------


def test_json_body_over_the_limit_is_413(hapi: Api) -> None:
    body = json.dumps({"name": "x", "kind": "base", "metadata": {"blob": "a" * 70_000}})
    assert assert_error(raw_post(hapi, "/checkpoints", body), 413)["error"] == "body_too_large"
    assert count(hapi, Checkpoint) == 0


def test_metadata_over_its_limit_is_422(hapi: Api) -> None:
    body = json.dumps({"name": "x", "kind": "base", "metadata": {"blob": "a" * 2000}})
    assert_error(raw_post(hapi, "/checkpoints", body), 422, "metadata", "1024")
    assert count(hapi, Checkpoint) == 0


@pytest.mark.parametrize("depth", [40, 20_000])
def test_deeply_nested_json_is_422_in_the_documented_shape(hapi: Api, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'{{"name": "x", "kind": "base", "metadata": {{"n": {nested}}}}}'
    assert assert_error(raw_post(hapi, "/checkpoints", body), 422, "nested")["error"]


@pytest.mark.parametrize("name", ["a\u0000b", "line\nbreak", "bell\u0007"])
def test_control_characters_in_names_are_refused(hapi: Api, name: str) -> None:
    body = json.dumps({"name": name, "kind": "base", "tags": ["ok"]})
    assert_error(raw_post(hapi, "/checkpoints", body), 422)
    tagged = json.dumps({"name": "fine", "kind": "base", "tags": [name]})
    assert_error(raw_post(hapi, "/checkpoints", tagged), 422)
    assert count(hapi, Checkpoint) == 0


def test_nul_in_a_query_is_422(hapi: Api) -> None:
    listed = hapi.client.get("/api/v1/checkpoints?name=a%00b", headers=hapi.headers)
    assert_error(listed, 422, "NUL")


def test_deduplicated_flag_agrees_between_put_and_listing(hapi: Api) -> None:
    data = st_bytes(tiny_state(0))
    first = hapi.register({}, name="one", complete=False)
    second = hapi.register({}, name="two", complete=False)
    answers = []
    for created in (first, second):
        put = hapi.client.put(
            f"/api/v1/checkpoints/{created['id']}/files/model.safetensors",
            content=data,
            headers=hapi.headers,
        )
        answers.append(put.json()["deduplicated"])
    assert answers == [False, True]
    shown = hapi.client.get(f"/api/v1/checkpoints/{second['id']}", headers=hapi.headers).json()
    assert shown["files"][0]["deduplicated"] is True
    page = hapi.client.get("/api/v1/checkpoints", headers=hapi.headers).json()
    assert all(item["files"][0]["deduplicated"] for item in page["items"])  # shared by both


@pytest.mark.parametrize("base_state", ["pending", "failed"])
def test_finetune_on_a_base_that_is_not_ready_is_refused(hapi: Api, base_state: str) -> None:
    base = hapi.register({}, name="base", complete=False)
    if base_state == "failed":  # completing without files fails validation
        hapi.client.post(f"/api/v1/checkpoints/{base['id']}/complete", headers=hapi.headers)
    body = json.dumps({"name": "ft", "kind": "finetune", "base_id": base["id"]})
    assert assert_error(raw_post(hapi, "/checkpoints", body), 409, base_state)
    assert count(hapi, Checkpoint) == 1


def test_put_route_does_not_offer_content_length(hapi: Api) -> None:
    schema = hapi.client.get("/api/v1/openapi.json").json()
    put = schema["paths"]["/api/v1/checkpoints/{checkpoint_id}/files/{name}"]["put"]
    names = {parameter["name"].lower() for parameter in put["parameters"]}
    assert "content-length" not in names and "x-content-sha256" in names


def test_put_still_checks_the_request_content_length(hapi: Api) -> None:
    created = hapi.register({}, complete=False)
    put = hapi.client.put(
        f"/api/v1/checkpoints/{created['id']}/files/model.safetensors",
        content=b"abc",
        headers={**hapi.headers, "Content-Length": "3"},
    )
    assert put.status_code == 200, put.text
    assert put.json()["size"] == 3


def test_unknown_route_answers_in_the_documented_shape(hapi: Api) -> None:
    assert assert_error(hapi.client.get("/api/v1/nope"), 404)["error"] == "not_found"


def test_overflow_and_bugs_still_answer_in_the_documented_shape(tmp_path: Path) -> None:
    """Safety nets: an OverflowError past the bounds is a 422, any other bug a JSON 500."""
    from fastapi.testclient import TestClient

    from registry.api.app import create_app
    from registry.settings import Settings

    app = create_app(Settings(home=tmp_path / "h"))

    @app.get("/overflow")
    def overflow() -> None:
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert assert_error(client.get("/overflow"), 422, "out of the database's range")
        assert assert_error(client.get("/bug"), 500)["error"] == "internal_error"
