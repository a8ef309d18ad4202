"""``checkpoints_public``: the same API forms as per-row validation, from one narrow files query."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import event
from sqlmodel import Session, col, select

from registry.models import (
    FILE_ROLES,
    Artifact,
    ArtifactRole,
    Checkpoint,
    CheckpointCreate,
    CheckpointPublic,
    CheckpointStatus,
    FilePublic,
)
from registry.services import checkpoints_public, create_checkpoint
from registry.services.checkpoints import file_public
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Env


def _per_row_reference(session: Session, checkpoints: list[Checkpoint]) -> list[CheckpointPublic]:
    """The conversion as it was: whole artifact rows and one ``model_validate`` per checkpoint."""
    files: dict[int, list[FilePublic]] = defaultdict(list)
    query = (
        select(Artifact)
        .where(col(Artifact.checkpoint_id).in_([c.id for c in checkpoints]))
        .where(col(Artifact.role).in_(FILE_ROLES))
        .order_by(col(Artifact.name))
    )
    for artifact in session.exec(query).all():
        files[artifact.checkpoint_id].append(file_public(artifact))
    return [
        CheckpointPublic.model_validate(
            c, update={"metadata": c.meta, "files": files.get(c.id or 0, [])}
        )
        for c in checkpoints
    ]


def _artifact(checkpoint_id: int, role: ArtifactRole, name: str, size: int) -> Artifact:
    digest = f"{checkpoint_id:02d}{size:062d}"
    index = {
        f"layers.{i}.weight": {"dtype": "F32", "shape": [4], "start": 0, "end": 16}
        for i in range(50)
    }
    return Artifact(
        checkpoint_id=checkpoint_id,
        role=role,
        name=name,
        sha256=digest,
        size=size,
        blob_key=f"blobs/sha256/{digest}",
        tensor_index=index,
        meta={"format": "pt"},
    )


def _seed(session: Session) -> list[Checkpoint]:
    base = create_checkpoint(session=session, data=CheckpointCreate(name="base", kind="base"))
    base.status = CheckpointStatus.ready  # fine-tunes are registered on ready bases only
    session.add(base)
    session.commit()
    tuned = create_checkpoint(
        session=session,
        data=CheckpointCreate(
            name="ft",
            kind="finetune",
            base_id=base.id,
            task="digits",
            run="r1",
            step=300,
            tags=["b", "a"],
            metadata={"lr": 0.001, "nested": {"k": [1, 2]}},
        ),
    )
    assert base.id is not None and tuned.id is not None
    session.add(_artifact(base.id, ArtifactRole.weights, "model.safetensors", 100))
    session.add(_artifact(tuned.id, ArtifactRole.weights, "b.safetensors", 200))
    session.add(_artifact(tuned.id, ArtifactRole.config, "a.index.json", 30))
    session.add(_artifact(tuned.id, ArtifactRole.task_vector, "task_vector.safetensors", 9))
    session.commit()
    return [tuned, base]


def test_same_forms_as_per_row_validation_from_one_query(env: Env) -> None:
    with env.session() as session:
        checkpoints = _seed(session)
        statements: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        event.listen(env.engine, "before_cursor_execute", record)
        try:
            public = checkpoints_public(session=session, checkpoints=checkpoints)
        finally:
            event.remove(env.engine, "before_cursor_execute", record)
        expected = _per_row_reference(session, checkpoints)
    assert all(isinstance(item, CheckpointPublic) for item in public)
    assert [p.model_dump(mode="json") for p in public] == [
        e.model_dump(mode="json") for e in expected
    ]
    assert [f.name for f in public[0].files] == ["a.index.json", "b.safetensors"]
    assert public[1].files[0].role == ArtifactRole.weights and public[0].tags == ["b", "a"]
    # One query for the files of the whole page and which of their blobs are shared
    # (``deduplicated``): constant in the page size, and never the tensor indexes.
    assert len(statements) == 1 and not any("tensor_index" in s for s in statements)


def test_empty_page(env: Env) -> None:
    with env.session() as session:
        assert checkpoints_public(session=session, checkpoints=[]) == []
