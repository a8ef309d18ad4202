"""Fixtures and tiny-checkpoint builders for the registry service and API tests.

Test modules import these with ``from tests.registry.registry_fixtures import *``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save
from sqlalchemy import Engine
from sqlmodel import Session, select

from registry.api.app import create_app
from registry.db import make_engine, upgrade_database
from registry.models import Artifact, Checkpoint
from registry.services import create_token
from registry.settings import Settings
from registry.storage import ObjectStore, open_store

__all__ = [
    "Env",
    "RecordingLauncher",
    "api",
    "env",
    "make_env",
    "raw_safetensors",
    "s3_api",
    "st_bytes",
    "tiny_state",
]


def tiny_state(
    seed: int = 0, *, scale: float = 1.0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A 2-layer model's weights (a few hundred bytes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "layers.0.weight": (8, 4),
        "layers.0.bias": (8,),
        "layers.1.weight": (4, 8),
        "layers.1.bias": (4,),
    }
    return {k: (torch.randn(s, generator=g) * scale).to(dtype) for k, s in shapes.items()}


def st_bytes(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)


def raw_safetensors(header: dict[str, Any], data: bytes, *, header_len: int | None = None) -> bytes:
    """Hand-built safetensors bytes (for malformed files)."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


class RecordingLauncher:
    """Records the hooks the registry calls (flows are not part of these tests)."""

    def __init__(self) -> None:
        self.ready: list[int] = []
        self.merges: list[int] = []
        self.searches: list[int] = []

    def checkpoint_ready(self, checkpoint_id: int) -> None:
        self.ready.append(checkpoint_id)

    def merge_requested(self, run_id: int) -> None:
        self.merges.append(run_id)

    def search_requested(self, search_id: int) -> None:
        self.searches.append(search_id)


@dataclass
class Env:
    settings: Settings
    engine: Engine
    store: ObjectStore
    launcher: RecordingLauncher = field(default_factory=RecordingLauncher)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def blobs(self) -> list[str]:
        return list(self.store.list("blobs/"))

    def artifact_rows(self, checkpoint_id: int | None = None) -> list[Artifact]:
        with self.session() as session:
            query = select(Artifact)
            if checkpoint_id is not None:
                query = query.where(Artifact.checkpoint_id == checkpoint_id)
            return list(session.exec(query).all())

    def checkpoint(self, checkpoint_id: int) -> Checkpoint:
        with self.session() as session:
            row = session.get(Checkpoint, checkpoint_id)
            assert row is not None
            return row


def make_env(
    database_url: str, tmp_path: Path, *, store_url: str | None = None, **overrides: Any
) -> Env:
    settings = Settings(
        home=tmp_path / "home",
        database_url=database_url,
        store_url=store_url or f"file://{tmp_path / 'store'}",
        **overrides,
    )
    upgrade_database(settings.database_url)
    store = open_store(
        settings.store_url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        part_size=settings.s3_part_size,
    )
    return Env(settings=settings, engine=make_engine(settings.database_url), store=store)


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> Iterator[Env]:
    environment = make_env(database_url, tmp_path)
    yield environment
    environment.engine.dispose()


@dataclass
class Api:
    client: TestClient
    env: Env
    headers: dict[str, str]
    read_headers: dict[str, str]

    def register(
        self,
        files: dict[str, bytes],
        *,
        name: str = "ckpt",
        kind: str = "base",
        complete: bool = True,
        **fields: Any,
    ) -> dict[str, Any]:
        """Create, upload and (optionally) complete; returns the last JSON response."""
        created = self.client.post(
            "/api/v1/checkpoints", json={"name": name, "kind": kind, **fields}, headers=self.headers
        )
        assert created.status_code == 201, created.text
        checkpoint = created.json()
        for file_name, data in files.items():
            put = self.client.put(
                f"/api/v1/checkpoints/{checkpoint['id']}/files/{file_name}",
                content=data,
                headers=self.headers,
            )
            assert put.status_code == 200, put.text
        if not complete:
            return checkpoint
        done = self.client.post(
            f"/api/v1/checkpoints/{checkpoint['id']}/complete", json={}, headers=self.headers
        )
        assert done.status_code == 200, done.text
        return done.json()


def build_api(environment: Env) -> Iterator[Api]:
    app = create_app(environment.settings, launcher=environment.launcher)
    with environment.session() as session:
        _, writer = create_token(session=session, name="writer", scopes=["write"])
        _, reader = create_token(session=session, name="reader", scopes=["read"])
    with TestClient(app) as client:
        yield Api(
            client=client,
            env=environment,
            headers={"Authorization": f"Bearer {writer}"},
            read_headers={"Authorization": f"Bearer {reader}"},
        )


@pytest.fixture
def s3_api(
    s3_store_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Api]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    environment = make_env(
        f"sqlite:///{tmp_path / 'r.db'}",
        tmp_path,
        store_url=s3_store_url,
        s3_endpoint_url=s3_endpoint,
    )
    yield from build_api(environment)
    environment.engine.dispose()


@pytest.fixture
def api(env: Env) -> Iterator[Api]:
    yield from build_api(env)
