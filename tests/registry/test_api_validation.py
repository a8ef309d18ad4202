"""Every bad input of the complete-validation step, through the real app: each gets a 4xx naming
the file (and tensor), leaves no ready checkpoint, no file rows and no orphan blob."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from registry.services import collect_garbage
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import (
    Api,
    build_api,
    make_env,
    raw_safetensors,
    st_bytes,
    tiny_state,
)

F32_16 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
INDEX = "model.safetensors.index.json"


@pytest.fixture
def vapi(database_url: str, tmp_path: Path) -> Iterator[Api]:
    environment = make_env(
        database_url,
        tmp_path,
        max_header_bytes=4096,
        scan_nonfinite=True,
        task_vectors_on_complete=False,
    )
    yield from build_api(environment)
    environment.engine.dispose()


def _nan_state() -> dict[str, torch.Tensor]:
    state = tiny_state(0)
    state["layers.1.bias"][2] = float("nan")
    return state


def _shards(*, index_names: tuple[str, str], duplicate: bool = False) -> dict[str, bytes]:
    state = tiny_state(0)
    first = {k: v for k, v in state.items() if k.startswith("layers.0")}
    second = {k: v for k, v in state.items() if k.startswith("layers.1")}
    if duplicate:
        second["layers.0.bias"] = state["layers.0.bias"]
    weight_map = {k: index_names[0] if k.startswith("layers.0") else index_names[1] for k in state}
    return {
        "a.safetensors": st_bytes(first),
        "b.safetensors": st_bytes(second),
        INDEX: json.dumps({"weight_map": weight_map}).encode(),
    }


# case id -> (files, kind, needs base, expected status, file named, tensor named or None, message part)
CASES: dict[str, tuple[dict[str, bytes], str, bool, int, str, str | None, str]] = {
    "truncated_header": (
        {"model.safetensors": st_bytes(tiny_state(0))[:40]},
        "base",
        False,
        422,
        "model.safetensors",
        None,
        "exceeds the file size",
    ),
    "header_beyond_cap": (
        {"model.safetensors": struct.pack("<Q", 10_000) + b" " * 10_100},
        "base",
        False,
        422,
        "model.safetensors",
        None,
        "exceeds the limit of 4096",
    ),
    "bad_json": (
        {"model.safetensors": struct.pack("<Q", 9) + b"{not json"},
        "base",
        False,
        422,
        "model.safetensors",
        None,
        "not valid JSON",
    ),
    "unknown_dtype": (
        {"model.safetensors": raw_safetensors({"w": {**F32_16, "dtype": "F33"}}, b"\0" * 16)},
        "base",
        False,
        422,
        "model.safetensors",
        "w",
        "unknown dtype",
    ),
    "offsets_outside_file": (
        {"model.safetensors": raw_safetensors({"w": F32_16}, b"\0" * 8)},
        "base",
        False,
        422,
        "model.safetensors",
        "w",
        "past the end",
    ),
    "overlapping_offsets": (
        {
            "model.safetensors": raw_safetensors(
                {"a": F32_16, "b": {**F32_16, "data_offsets": [8, 24]}}, b"\0" * 24
            )
        },
        "base",
        False,
        422,
        "model.safetensors",
        "b",
        "overlaps",
    ),
    "gapped_offsets": (
        {
            "model.safetensors": raw_safetensors(
                {"a": F32_16, "b": {**F32_16, "data_offsets": [20, 36]}}, b"\0" * 36
            )
        },
        "base",
        False,
        422,
        "model.safetensors",
        "b",
        "gap",
    ),
    "nan_with_scan": (
        {"model.safetensors": st_bytes(_nan_state())},
        "base",
        False,
        422,
        "model.safetensors",
        "layers.1.bias",
        "NaN",
    ),
    "base_shape_mismatch": (
        {"model.safetensors": st_bytes({**tiny_state(1), "layers.0.weight": torch.zeros(4, 8)})},
        "finetune",
        True,
        409,
        "model.safetensors",
        "layers.0.weight",
        "shape (4, 8) vs base (8, 4)",
    ),
    "missing_base_tensor": (
        {"model.safetensors": st_bytes({**tiny_state(1), "layers.2.weight": torch.zeros(2)})},
        "finetune",
        True,
        409,
        "model.safetensors",
        "layers.2.weight",
        "missing in base",
    ),
    "lora_shape_mismatch": (
        {
            "adapter_config.json": b"{}",
            "adapter_model.safetensors": st_bytes(
                {"base_model.model.layers.0.lora_A.weight": torch.zeros(2, 5)}
            ),
        },
        "adapter",
        True,
        409,
        "adapter_model.safetensors",
        "base_model.model.layers.0.lora_A.weight",
        "needs 4 columns",
    ),
    "adapter_without_config": (
        {"adapter_model.safetensors": st_bytes({"x.lora_A.weight": torch.zeros(2, 4)})},
        "adapter",
        False,
        422,
        "adapter_config.json",
        None,
        "missing file",
    ),
    "index_names_missing_shard": (
        _shards(index_names=("a.safetensors", "c.safetensors")),
        "base",
        False,
        422,
        INDEX,
        "layers.1.weight",
        "was not uploaded",
    ),
    "tensor_in_two_shards": (
        _shards(index_names=("a.safetensors", "b.safetensors"), duplicate=True),
        "base",
        False,
        422,
        "b.safetensors",
        "layers.0.bias",
        "exactly one shard",
    ),
    "shards_without_index": (
        {
            "a.safetensors": st_bytes({"x": torch.zeros(2)}),
            "b.safetensors": st_bytes({"y": torch.zeros(2)}),
        },
        "base",
        False,
        422,
        INDEX,
        None,
        "no 'model.safetensors.index.json'",
    ),
    "no_safetensors": (
        {"config.json": b"{}"},
        "base",
        False,
        422,
        "",
        None,
        "no .safetensors file",
    ),
}


def _assert_nothing_left(
    api: Api, checkpoint_id: int, blobs_before: list[str], *, status: str
) -> None:
    row = api.env.checkpoint(checkpoint_id)
    assert row.status == status
    assert api.env.artifact_rows(checkpoint_id) == []
    with api.env.session() as session:  # released blobs go to gc, which reclaims them
        collect_garbage(
            session=session, store=api.env.store, grace_s=0, upload_ttl_s=0, dry_run=False
        )
    assert api.env.blobs() == blobs_before, "no orphan blob may remain"
    listed = api.client.get("/api/v1/checkpoints", params={"status": "ready"}).json()["items"]
    assert checkpoint_id not in [item["id"] for item in listed]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_rejected_and_cleaned_up(vapi: Api, case: str) -> None:
    files, kind, needs_base, status, file, tensor, part = CASES[case]
    fields: dict[str, Any] = {}
    if needs_base:
        fields["base_id"] = vapi.register(
            {"model.safetensors": st_bytes(tiny_state(0))}, name="base"
        )["id"]
    blobs_before = vapi.env.blobs()
    created = vapi.register(files, name=case, kind=kind, complete=False, **fields)
    done = vapi.client.post(f"/api/v1/checkpoints/{created['id']}/complete", headers=vapi.headers)
    assert done.status_code == status, done.text
    detail = done.json()["detail"]
    assert part in detail["message"]
    if file:
        assert f"'{file}'" in detail["message"] and detail["file"] == file
    if tensor:
        assert f"'{tensor}'" in detail["message"] and detail["tensor"] == tensor
    _assert_nothing_left(vapi, created["id"], blobs_before, status="failed")
    assert vapi.env.launcher.ready == ([fields["base_id"]] if needs_base else [])


def test_sha_mismatch_on_complete(vapi: Api) -> None:
    data = st_bytes(tiny_state(0))
    created = vapi.register({"model.safetensors": data}, complete=False)
    declared = {"model.safetensors": hashlib.sha256(b"other").hexdigest()}
    done = vapi.client.post(
        f"/api/v1/checkpoints/{created['id']}/complete",
        json={"sha256": declared},
        headers=vapi.headers,
    )
    assert done.status_code == 422
    assert (
        done.json()["detail"]["error"] == "sha256_mismatch"
        and "'model.safetensors'" in done.json()["detail"]["message"]
    )
    _assert_nothing_left(vapi, created["id"], [], status="failed")


def test_sha_mismatch_on_put_stores_nothing(vapi: Api) -> None:
    created = vapi.register({}, complete=False)
    url = f"/api/v1/checkpoints/{created['id']}/files/model.safetensors"
    wrong = {**vapi.headers, "X-Content-SHA256": hashlib.sha256(b"other").hexdigest()}
    put = vapi.client.put(url, content=st_bytes(tiny_state(0)), headers=wrong)
    assert put.status_code == 422 and "'model.safetensors'" in put.json()["detail"]["message"]
    _assert_nothing_left(vapi, created["id"], [], status="pending")


@pytest.mark.parametrize(
    "name", ["..%2Fx", "a%2Fb", ".hidden", "..", "x%00y", "%C3%A9.safetensors"]
)
def test_bad_file_names_are_refused(vapi: Api, name: str) -> None:
    created = vapi.register({}, complete=False)
    put = vapi.client.put(
        f"/api/v1/checkpoints/{created['id']}/files/{name}", content=b"data", headers=vapi.headers
    )
    assert put.status_code in (404, 405, 422), put.text  # httpx normalises a bare ".." away
    if put.status_code == 422:
        assert "invalid file name" in put.json()["detail"]["message"]
    _assert_nothing_left(vapi, created["id"], [], status="pending")
