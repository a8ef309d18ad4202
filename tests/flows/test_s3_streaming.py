"""S3-backed merges stream their inputs in place: no download cache, and the same bytes out.

The same registrations and TIES merge run three times, under Prefect's test harness with a real
moto_server over HTTP: on a file store, on S3 streamed (the default, ``merge_inputs=stream``)
and on S3 through the download cache (``merge_inputs=cache``). One tensor is large enough to be
merged in row slices, so the engine's ``get_rows`` path (with its prefetch) is what runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flows import runtime as flow_runtime
from flows.pipelines import merge_checkpoints
from flows.preparation import prepare
from mergeops.io.writer import ShardedWriter
from registry.db import upgrade_database
from registry.models import CheckpointCreate, CheckpointKind, MergeRunStatus
from registry.services import merge_runs as run_service
from registry.services.common import checkpoint_files
from registry.services.completion import register_directory
from registry.settings import Settings
from registry.storage.range_source import BlobTensorSource, ShardedBlobTensorSource

SHAPES = {
    "embed.weight": (1024, 640),  # 2.5 MiB of float32: merged in row slices
    "layer.weight": (64, 64),
    "layer.bias": (64,),
    "norm.weight": (640,),
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _write(folder: Path, state: dict[str, torch.Tensor], shard_size: int | str) -> Path:
    with ShardedWriter(folder, max_shard_size=shard_size) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    return folder


@pytest.fixture
def s3_creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def reset_runtime() -> Iterator[None]:
    yield
    flow_runtime.reset()


def _merge(tmp: Path, **store: Any) -> tuple[dict[str, str], Settings, int]:
    """Register base (2 shards) + 2 fine-tunes, run a TIES merge; returns output sha256s."""
    settings = Settings(
        home=tmp / "home", task_vectors_on_complete=False, mlflow_tracking_uri="http://127.0.0.1:9",
        **store,
    )  # fmt: skip
    upgrade_database(settings.database_url)
    runtime = flow_runtime.configure(settings)
    ids = []
    for seed, name in enumerate(["base", "ft-a", "ft-b"]):
        shard = "1MB" if name == "base" else "1GB"  # the base is sharded: 2 files + index
        folder = _write(tmp / "src" / name, _state(seed), shard)
        kind = CheckpointKind.base if name == "base" else CheckpointKind.finetune
        fields = {"base_id": ids[0]} if ids else {}
        with runtime.session() as session:
            checkpoint = register_directory(
                session=session, store=runtime.store, settings=settings,
                data=CheckpointCreate(name=name, kind=kind, **fields), directory=folder,
            )  # fmt: skip
        ids.append(checkpoint.id or 0)
    request = run_service.MergeRequest(
        method="ties",
        base_id=ids[0],
        params={"lambda": 1.0},
        inputs=[
            run_service.MergeInputSpec(checkpoint_id=i, params={"density": 0.5}) for i in ids[1:]
        ],
    )
    with runtime.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    output_id = merge_checkpoints(run.id)
    with runtime.session() as session:
        assert (
            run_service.get_merge_run(session=session, run_id=run.id).status
            == MergeRunStatus.succeeded
        )
        files = checkpoint_files(session, output_id or 0)
    digests = {
        f.name: hashlib.sha256(b"".join(runtime.store.iter_bytes(f.blob_key))).hexdigest()
        for f in files
    }
    return digests, settings, run.id or 0


def _cached_blobs(settings: Settings) -> list[Path]:
    assert settings.work_dir is not None
    blobs = settings.work_dir / "cache" / "blobs"
    return sorted(blobs.iterdir()) if blobs.is_dir() else []


@pytest.mark.usefixtures("prefect_harness", "s3_creds", "reset_runtime")
def test_s3_merge_streams_in_place_and_matches_the_file_store(
    tmp_path: Path, s3_endpoint: str, s3_store_url: str
) -> None:
    local, _, _ = _merge(tmp_path / "file")
    assert any(name.endswith(".safetensors") for name in local)

    streamed, settings, run_id = _merge(
        tmp_path / "stream", store_url=s3_store_url, s3_endpoint_url=s3_endpoint
    )
    assert streamed == local  # bit-identical output
    assert _cached_blobs(settings) == []  # nothing was downloaded
    runtime = flow_runtime.current_runtime()
    with runtime.session() as session:
        assert settings.work_dir is not None
        prepared = prepare(
            session=session, store=runtime.store, work_root=settings.work_dir, run_id=run_id
        )
    assert all(isinstance(m, BlobTensorSource) for m in prepared.models)
    assert isinstance(prepared.base, ShardedBlobTensorSource)
    assert sorted(prepared.base.keys()) == sorted(SHAPES)

    cached, settings, _ = _merge(
        tmp_path / "cache", store_url=f"{s3_store_url}-cache", s3_endpoint_url=s3_endpoint,
        merge_inputs="cache",
    )  # fmt: skip
    assert cached == local
    assert len(_cached_blobs(settings)) >= 4  # 2 base shards + 2 fine-tunes (+ index/config)
