"""The in-process service API the flows call: register_directory, tensor sources, file checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from registry.errors import InvalidInput, InvalidState, NotFound, ValidationFailed
from registry.models import CheckpointCreate, CheckpointStatus
from registry.services import (
    add_file_from_path,
    add_file_from_stream,
    checkpoint_tensor_source,
    collect_garbage,
    complete_checkpoint,
    create_checkpoint,
    get_checkpoint,
    list_checkpoints,
    register_directory,
)
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Env, st_bytes, tiny_state


def _write(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_register_directory_and_tensor_sources(env: Env, tmp_path: Path) -> None:
    state = tiny_state(0)
    single = _write(
        tmp_path / "single", {"model.safetensors": st_bytes(state), "config.json": b"{}"}
    )
    weight_map = {
        k: "a.safetensors" if k.startswith("layers.0") else "b.safetensors" for k in state
    }
    sharded = _write(
        tmp_path / "sharded",
        {
            "a.safetensors": st_bytes(
                {k: v for k, v in state.items() if weight_map[k] == "a.safetensors"}
            ),
            "b.safetensors": st_bytes(
                {k: v for k, v in state.items() if weight_map[k] == "b.safetensors"}
            ),
            "model.safetensors.index.json": json.dumps({"weight_map": weight_map}).encode(),
        },
    )
    with env.session() as session:
        base = register_directory(
            session=session,
            store=env.store,
            settings=env.settings,
            data=CheckpointCreate(name="base", kind="base"),
            directory=single,
            launcher=env.launcher,
        )
        merged = register_directory(
            session=session,
            store=env.store,
            settings=env.settings,
            data=CheckpointCreate(name="m", kind="merged", base_id=base.id),
            directory=sharded,
        )
        assert base.status == merged.status == CheckpointStatus.ready
        assert env.launcher.ready == [base.id]
        for checkpoint_id in (base.id or 0, merged.id or 0):
            source = checkpoint_tensor_source(
                session=session, store=env.store, checkpoint_id=checkpoint_id
            )
            # A sharded checkpoint lists tensors in its index file's order, like mergeops' reader.
            expected = list(weight_map) if checkpoint_id == merged.id else sorted(state)
            assert source.keys() == expected
            for key, tensor in state.items():
                assert torch.equal(source.get(key), tensor)
                assert tuple(source.metadata(key).shape) == tuple(tensor.shape)
        items, total = list_checkpoints(session=session, base_id=base.id)
        assert total == 1 and items[0].id == merged.id
        assert get_checkpoint(session=session, checkpoint_id=base.id or 0).total_bytes == sum(
            p.stat().st_size for p in single.iterdir()
        )


def test_register_directory_failure_leaves_nothing(env: Env, tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad", {"model.safetensors": st_bytes(tiny_state(0))[:30]})
    with env.session() as session:
        with pytest.raises(ValidationFailed, match=r"'model\.safetensors'"):
            register_directory(
                session=session,
                store=env.store,
                settings=env.settings,
                data=CheckpointCreate(name="bad", kind="base"),
                directory=bad,
            )
        items, _ = list_checkpoints(session=session, status=CheckpointStatus.failed)
        assert [c.name for c in items] == ["bad"] and items[0].error
        collect_garbage(
            session=session, store=env.store, grace_s=0, upload_ttl_s=0, dry_run=False
        )  # the released blob
    assert env.blobs() == [] and env.artifact_rows() == []


def test_file_name_and_state_checks(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(st_bytes(tiny_state(0)))
    with env.session() as session:
        checkpoint = create_checkpoint(
            session=session, data=CheckpointCreate(name="c", kind="base")
        )
        cid = checkpoint.id or 0
        for name in ("../x", "a/b", "..", ".env", "x\\y", ""):
            with pytest.raises(InvalidInput, match="invalid file name"):
                add_file_from_path(
                    session=session, store=env.store, checkpoint_id=cid, path=path, name=name
                )
        with pytest.raises(InvalidInput, match="not 64 hex"):
            add_file_from_stream(
                session=session,
                store=env.store,
                checkpoint_id=cid,
                name="x.safetensors",
                chunks=[b"x"],
                declared_sha256="abc",
            )
        with pytest.raises(NotFound):
            add_file_from_path(session=session, store=env.store, checkpoint_id=999_999, path=path)
        add_file_from_path(
            session=session, store=env.store, checkpoint_id=cid, path=path, name="model.safetensors"
        )
        complete_checkpoint(
            session=session, store=env.store, settings=env.settings, checkpoint_id=cid
        )
        with pytest.raises(InvalidState, match="pending"):
            add_file_from_path(session=session, store=env.store, checkpoint_id=cid, path=path)
        with pytest.raises(InvalidInput, match="tags"):
            create_checkpoint(
                session=session, data=CheckpointCreate(name="t", kind="base", tags=[" "])
            )
    assert env.blobs() and len(env.blobs()) == 1
