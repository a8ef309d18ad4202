"""Compressed storage end to end through the REST API, on the file store and on S3 (moto_server):
``complete`` stores weights as zipnn (or zipnn-delta against the base), releases the raw upload,
reuses a stored compressed twin, keeps raw when compression does not pay, and every download
(whole file and HTTP Range) returns the original bytes with the original sha256."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlmodel import select

import registry.storage.zipnn_encoder as encoder
from registry.models import Artifact
from registry.services.blobs import stored_blob
from registry.services.gc import collect_garbage
from registry.services.tensors import checkpoint_tensor_source
from registry.storage import blob_key
from registry.storage.codecs import read_original
from tests.registry.conftest import LiveRegistry
from tests.registry.registry_fixtures import Api, build_api, make_env, st_bytes

CHUNK = 64 * 1024
RANGES = [
    "bytes=0-7",
    "bytes=8-200",
    "bytes=65530-65545",
    "bytes=-1",
    "bytes=100000-",
    "bytes=-70000",
]


def _base_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "embed.weight": (torch.randn(384, 256, generator=gen) * 0.02).to(torch.bfloat16),
        "layers.0.mlp.weight": (torch.randn(256, 256, generator=gen) * 0.02).to(torch.bfloat16),
        "layers.0.norm.weight": torch.ones(256, dtype=torch.bfloat16),
        "head.bias": torch.zeros(64, dtype=torch.bfloat16),
    }


def _sparse_finetune(base: dict[str, torch.Tensor], share: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    out = {}
    for name, tensor in base.items():
        mask = torch.rand(tensor.shape, generator=gen) < share
        step = torch.randn(tensor.shape, generator=gen) * 0.003
        out[name] = (tensor.float() + step * mask).to(tensor.dtype)
    return out


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return str(request.getfixturevalue("s3_store_url"))


def _api(
    request: pytest.FixtureRequest, tmp_path: Path, store_url: str, **settings: Any
) -> Iterator[Api]:
    s3 = (
        {"s3_endpoint_url": request.getfixturevalue("s3_endpoint")}
        if store_url.startswith("s3")
        else {}
    )
    environment = make_env(
        f"sqlite:///{tmp_path / 'r.db'}", tmp_path, store_url=store_url, **s3, **settings
    )
    yield from build_api(environment)
    environment.engine.dispose()


@pytest.fixture
def api(
    request: pytest.FixtureRequest, tmp_path: Path, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    monkeypatch.setattr(encoder, "CHUNK_BYTES", CHUNK)  # several chunks per file
    yield from _api(request, tmp_path, store_url)


@pytest.fixture
def raw_api(request: pytest.FixtureRequest, tmp_path: Path, store_url: str) -> Iterator[Api]:
    yield from _api(request, tmp_path, store_url, store_compression="off")


def _file(api: Api, checkpoint: dict[str, Any], name: str = "model.safetensors") -> dict[str, Any]:
    return next(f for f in checkpoint["files"] if f["name"] == name)


def _check_downloads(api: Api, checkpoint_id: int, data: bytes) -> None:
    url = f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"
    whole = api.client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["x-content-sha256"] == hashlib.sha256(whole.content).hexdigest()
    for header in RANGES:
        part = api.client.get(url, headers={"Range": header})
        assert part.status_code == 206, (header, part.text)
        first, last = part.headers["content-range"].split(" ")[1].split("/")[0].split("-")
        assert part.content == data[int(first) : int(last) + 1], header


def _collect(api: Api) -> list[str]:
    """Run garbage collection with no grace period; the blobs left in the store."""
    with api.env.session() as session:
        collect_garbage(
            session=session,
            store=api.env.store,
            grace_s=0,
            upload_ttl_s=3600,
            dry_run=False,
            now=datetime.now(UTC) + timedelta(seconds=5),
        )
    return api.env.blobs()


def _row(api: Api, checkpoint_id: int) -> Artifact:
    with api.env.session() as session:
        query = select(Artifact).where(
            Artifact.checkpoint_id == checkpoint_id, Artifact.role == "weights"
        )
        row = session.exec(query).one()
    return row


def test_raw_when_compression_is_off(raw_api: Api) -> None:
    data = st_bytes(_base_state())
    checkpoint = raw_api.register({"model.safetensors": data}, name="base")
    described = _file(raw_api, checkpoint)
    assert described["codec"] == "raw" and described["stored_size"] == len(data)
    _check_downloads(raw_api, checkpoint["id"], data)


def test_zipnn_and_delta_downloads_are_the_original(api: Api) -> None:
    base_state = _base_state()
    base_data = st_bytes(base_state)
    base = api.register({"model.safetensors": base_data}, name="base")
    described = _file(api, base)
    assert described["codec"] == "zipnn", described
    assert described["size"] == len(base_data) and described["stored_size"] < 0.8 * len(base_data)
    assert blob_key(described["sha256"]) not in _collect(api)  # raw upload released to gc
    _check_downloads(api, base["id"], base_data)

    tuned_data = st_bytes(_sparse_finetune(base_state), metadata={"task": "t"})
    tuned = api.register(
        {"model.safetensors": tuned_data}, name="ft", kind="finetune", base_id=base["id"]
    )
    tuned_file = _file(api, tuned)
    assert tuned_file["codec"] == "zipnn-delta"
    assert tuned_file["stored_size"] * 3 < len(tuned_data)
    row = _row(api, tuned["id"])
    assert row.codec_base_sha256 == described["sha256"]
    _check_downloads(api, tuned["id"], tuned_data)
    with api.env.session() as session:  # the merge engine's row reads go through the same path
        blob = stored_blob(session, row)
    entry = row.tensor_index["layers.0.mlp.weight"]
    assert (
        read_original(api.env.store, blob, entry["start"], 999)
        == tuned_data[entry["start"] : entry["start"] + 999]
    )

    with api.env.session() as session:  # a merge input: tensors read by range, decoded
        source = checkpoint_tensor_source(
            session=session, store=api.env.store, checkpoint_id=tuned["id"]
        )
        for name, tensor in _sparse_finetune(base_state).items():
            assert torch.equal(source.get(name), tensor), name

    again = api.register(
        {"model.safetensors": tuned_data}, name="ft-again", kind="finetune", base_id=base["id"]
    )
    assert _file(api, again)["codec"] == "zipnn-delta"
    assert _row(api, again["id"]).blob_key == row.blob_key  # the compressed twin is reused
    assert blob_key(tuned_file["sha256"]) not in _collect(api)
    _check_downloads(api, again["id"], tuned_data)
    _check_downloads(api, base["id"], base_data)


def test_incompressible_file_stays_raw(api: Api) -> None:
    gen = torch.Generator().manual_seed(5)
    noise = {"noise": torch.randint(0, 256, (200_000,), dtype=torch.uint8, generator=gen)}
    data = st_bytes(noise)
    checkpoint = api.register({"model.safetensors": data}, name="noise")
    described = _file(api, checkpoint)
    assert described["codec"] == "raw" and described["stored_size"] == len(data)
    assert _collect(api) == [blob_key(described["sha256"])]  # the discarded candidate went
    _check_downloads(api, checkpoint["id"], data)


def test_cli_show_lists_codec_and_stored_size(live_registry: LiveRegistry, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from registry.client.cli import registry_app

    path = tmp_path / "model.safetensors"
    save_file(_base_state(), str(path))
    auth = ["--url", live_registry.url, "--token", live_registry.token]
    runner = CliRunner()
    registered = runner.invoke(registry_app, ["register", str(path), "--kind", "base", *auth])
    assert registered.exit_code == 0, registered.output
    checkpoint_id = registered.output.split("registered checkpoint ")[1].split()[0]
    shown = runner.invoke(registry_app, ["show", checkpoint_id, *auth])
    assert shown.exit_code == 0, shown.output
    files = shown.output.split("       files:\n")[1].split("     metrics:")[0]
    header, row = files.strip().splitlines()
    assert header.split()[:4] == ["NAME", "SIZE", "STORED_SIZE", "CODEC"]
    name, size, stored, codec = row.split()[:4]
    assert name == "model.safetensors"
    assert codec == "zipnn" and int(stored) < int(size) == path.stat().st_size


def test_attach_by_reference_to_content_stored_compressed(api: Api) -> None:
    data = st_bytes(_base_state())
    first = api.register({"model.safetensors": data}, name="first")
    sha256 = _file(api, first)["sha256"]
    assert blob_key(sha256) not in _collect(api)  # only the compressed object is left
    second = api.register({}, name="second", complete=False)
    attached = api.client.post(
        f"/api/v1/checkpoints/{second['id']}/files:by-reference",
        json={"name": "model.safetensors", "sha256": sha256},
        headers=api.headers,
    )
    assert attached.status_code == 200, attached.text
    missing = api.client.post(
        f"/api/v1/checkpoints/{second['id']}/files:by-reference",
        json={"name": "other.safetensors", "sha256": "ab" * 32},
        headers=api.headers,
    )
    assert missing.status_code == 404 and "not in the store" in missing.text, missing.text
    done = api.client.post(f"/api/v1/checkpoints/{second['id']}/complete", headers=api.headers)
    assert done.status_code == 200, done.text
    assert _file(api, done.json())["codec"] == "zipnn"
    assert _row(api, second["id"]).blob_key == _row(api, first["id"]).blob_key
    _check_downloads(api, second["id"], data)
