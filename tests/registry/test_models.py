"""The data model: schema families, constraint names, uniqueness rules, ordered merge inputs."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel, col, select

from registry.models import (
    Checkpoint,
    CheckpointCreate,
    CheckpointPublic,
    MergePolicy,
    MergeRun,
    MergeRunInput,
    MergeRunStatus,
)
from registry.services import checkpoint_public
from tests.registry.registry_fixtures import *  # noqa: F403
from tests.registry.registry_fixtures import Env


def test_create_schema_validates() -> None:
    data = CheckpointCreate(name="m", kind="finetune", base_id=1, tags=["a"], metadata={"lr": 1e-4})
    assert data.metadata == {"lr": 1e-4}
    with pytest.raises(ValidationError):
        CheckpointCreate(name="m", kind="bogus")
    with pytest.raises(ValidationError):
        CheckpointCreate(name="", kind="base")
    assert set(CheckpointPublic.model_fields) >= {
        "id",
        "status",
        "total_bytes",
        "files",
        "metadata",
        "created_at",
    }


def test_constraint_names_follow_the_convention() -> None:
    tables = SQLModel.metadata.tables
    assert tables["checkpoint"].primary_key.name == "pk_checkpoint"
    uniques = {
        c.name for c in tables["mergerun"].constraints if c.name and c.name.startswith("uq_")
    }
    assert "uq_mergerun_idempotency_key" in uniques
    fks = {fk.name for fk in tables["artifact"].foreign_key_constraints}
    assert fks == {"fk_artifact_checkpoint_id_checkpoint"}


def test_merge_run_rows(env: Env) -> None:
    with env.session() as session:
        inputs = [Checkpoint(name=f"c{i}", kind="finetune") for i in range(3)]
        session.add_all(inputs)
        policy = MergePolicy(
            name="nightly",
            method="ties",
            params={"density": 0.2},
            selector={"task": "math"},
            trigger="cron",
            cron="0 3 * * *",
            evaluator="digits",
        )
        session.add(policy)
        session.commit()
        run = MergeRun(
            policy_id=policy.id,
            method="ties",
            params={"density": 0.2},
            idempotency_key="k" * 64,
            orchestration_run_id="prefect-1",
            mlflow_run_id="mlf-1",
        )
        session.add(run)
        session.commit()
        for position, (checkpoint, weight) in enumerate(
            zip(reversed(inputs), (0.5, 0.3, 0.2), strict=True)
        ):
            session.add(
                MergeRunInput(
                    merge_run_id=run.id or 0,
                    position=position,
                    checkpoint_id=checkpoint.id or 0,
                    weight=weight,
                )
            )
        session.commit()
        ordered = session.exec(
            select(MergeRunInput)
            .where(MergeRunInput.merge_run_id == run.id)
            .order_by(col(MergeRunInput.position))
        ).all()
        assert [i.checkpoint_id for i in ordered] == [c.id for c in reversed(inputs)]
        assert run.status == MergeRunStatus.queued and policy.enabled
        session.add(MergeRun(method="ties", params={}, idempotency_key="k" * 64))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        public = checkpoint_public(session=session, checkpoint=inputs[0])
        assert public.metadata == {} and public.files == [] and public.status == "pending"
