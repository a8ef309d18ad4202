"""The registry's data model: SQLModel tables and their API schema families.

Families follow ``XBase`` (shared fields) / ``XCreate`` (client input) / ``XPublic`` (API output) /
``X(table=True)`` (row). Alembic migrates these tables (``migrations/versions``).
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator
from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, String, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

# API schemas name a field ``metadata`` like the contract; it shadows SQLModel.metadata harmlessly
# on non-table models (tables store it in the ``meta`` attribute instead).
warnings.filterwarnings("ignore", message='Field name "metadata"', category=UserWarning)

# Deterministic constraint names, so migrations (and SQLite batch mode) can address them.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# What the database's integer columns hold; API fields are bounded to it (422, not a 500).
# Ids compare fine as 64-bit values; ``step`` columns are INTEGER (32 bits on PostgreSQL).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_utc(value: datetime) -> datetime:
    # SQLite hands timestamps back without their zone; they are stored in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# API timestamps always carry their zone (RFC 3339 ``date-time``, as the OpenAPI says).
UtcDateTime = Annotated[datetime, AfterValidator(_as_utc)]


def _json(**kwargs: Any) -> Any:
    return Field(default_factory=kwargs.pop("factory", dict), sa_type=JSON, **kwargs)


def _when(nullable: bool = False, **kwargs: Any) -> Any:
    default: Any = None if nullable else utcnow
    if nullable:
        return Field(default=None, sa_type=DateTime(timezone=True), **kwargs)
    return Field(default_factory=default, sa_type=DateTime(timezone=True), **kwargs)


class CheckpointKind(StrEnum):
    base = "base"
    finetune = "finetune"
    adapter = "adapter"
    merged = "merged"


class CheckpointStatus(StrEnum):
    pending = "pending"
    ready = "ready"
    failed = "failed"
    deleted = "deleted"


class ArtifactRole(StrEnum):
    weights = "weights"
    config = "config"  # non-tensor files of a checkpoint: index json, adapter_config.json, ...
    second_moment = "second_moment"
    fisher = "fisher"
    task_vector = "task_vector"
    mask = "mask"
    merge_state = "merge_state"
    gram = "gram"  # layer-input XᵀX per linear weight (activation-aware merges)
    features = "features"  # per-layer activations on shared inputs (pleas, ot_fusion)


FILE_ROLES = (ArtifactRole.weights, ArtifactRole.config)


class MetricSource(StrEnum):
    client = "client"
    evaluation = "evaluation"


class LineageRole(StrEnum):
    base = "base"
    input = "input"
    mask = "mask"
    state = "state"


class MergeTrigger(StrEnum):
    on_register = "on_register"
    cron = "cron"
    manual = "manual"


class MergeRunStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


# --- checkpoints -------------------------------------------------------------------------------


class CheckpointBase(SQLModel):
    name: str = Field(min_length=1, max_length=255, index=True)
    kind: CheckpointKind = Field(sa_type=String(16))
    base_id: int | None = Field(
        default=None, foreign_key="checkpoint.id", index=True, ge=INT64_MIN, le=INT64_MAX
    )
    task: str | None = Field(default=None, max_length=255, index=True)
    run: str | None = Field(default=None, max_length=255, index=True)
    step: int | None = Field(default=None, ge=INT32_MIN, le=INT32_MAX)


class CheckpointCreate(CheckpointBase):
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)  # type: ignore[assignment,misc]


class Checkpoint(CheckpointBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    tags: list[str] = _json(factory=list)
    # ``metadata`` is reserved by SQLAlchemy's declarative base; the column keeps the API's name.
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON))
    status: CheckpointStatus = Field(
        default=CheckpointStatus.pending, sa_type=String(16), index=True
    )
    error: str | None = None
    total_bytes: int = Field(default=0, sa_type=BigInteger)
    created_at: datetime = _when(index=True)
    ready_at: datetime | None = _when(nullable=True)


class CheckpointTag(SQLModel, table=True):
    """One row per (checkpoint, tag), so tag filters are indexed on every database."""

    checkpoint_id: int = Field(foreign_key="checkpoint.id", primary_key=True)
    tag: str = Field(primary_key=True, max_length=255, index=True)


class FilePublic(SQLModel):
    name: str
    sha256: str
    size: int
    role: ArtifactRole
    deduplicated: bool = False
    # How the file is kept at rest: "raw" or a lossless codec, and the bytes the store holds
    # (``size`` and ``sha256`` are always the original file's, which downloads return).
    codec: str = "raw"
    stored_size: int | None = None


class CheckpointPublic(CheckpointBase):
    id: int
    tags: list[str]
    metadata: dict[str, Any] = Field(default_factory=dict)  # type: ignore[assignment,misc]
    status: CheckpointStatus
    error: str | None = None
    total_bytes: int
    created_at: UtcDateTime
    files: list[FilePublic] = Field(default_factory=list)


class CheckpointPage(SQLModel):
    items: list[CheckpointPublic]
    total: int
    limit: int
    offset: int


# --- artifacts (files of a checkpoint and derived tensors) ----------------------------------------


class ArtifactBase(SQLModel):
    role: ArtifactRole = Field(sa_type=String(32))
    name: str = Field(max_length=255)
    sha256: str = Field(max_length=64, index=True)
    size: int = Field(sa_type=BigInteger)


class Artifact(ArtifactBase, table=True):
    __table_args__ = (UniqueConstraint("checkpoint_id", "role", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    checkpoint_id: int = Field(foreign_key="checkpoint.id", index=True)
    blob_key: str = Field(max_length=512, index=True)  # "is this blob shared" lookups
    # How the blob is stored at rest: "raw" (the file's own bytes) or a lossless codec; the
    # sha256 and ``size`` are always the original file's. ``codec_base_sha256`` names the blob a
    # delta codec was taken against (a fine-tune's base file).
    codec: str = Field(default="raw", max_length=32)
    stored_size: int | None = Field(default=None, sa_type=BigInteger)
    codec_base_sha256: str | None = Field(default=None, max_length=64)
    # tensor name -> {"dtype", "shape", "start", "end"} (absolute byte range), for range reads.
    tensor_index: dict[str, Any] = _json()
    # safetensors ``__metadata__`` plus derived facts (e.g. task-vector norms).
    meta: dict[str, Any] = Field(default_factory=dict, sa_column=Column("metadata", JSON))
    created_at: datetime = _when()


class ArtifactPublic(ArtifactBase):
    id: int
    checkpoint_id: int
    tensors: int
    codec: str = "raw"
    stored_size: int | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)  # type: ignore[assignment,misc]


# --- metrics ---------------------------------------------------------------------------------


class MetricBase(SQLModel):
    name: str = Field(min_length=1, max_length=255, index=True)
    value: float
    step: int | None = Field(default=None, ge=INT32_MIN, le=INT32_MAX)
    dataset: str | None = Field(default=None, max_length=255)
    split: str | None = Field(default=None, max_length=64)
    source: MetricSource = Field(default=MetricSource.client, sa_type=String(16))


class MetricCreate(MetricBase):
    pass


class Metric(MetricBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    checkpoint_id: int = Field(foreign_key="checkpoint.id", index=True)
    created_at: datetime = _when()


class MetricPublic(MetricBase):
    id: int
    checkpoint_id: int
    created_at: UtcDateTime


# --- lineage ---------------------------------------------------------------------------------


class LineageBase(SQLModel):
    parent_id: int = Field(foreign_key="checkpoint.id")
    child_id: int = Field(foreign_key="checkpoint.id")
    role: LineageRole = Field(sa_type=String(16))


class LineageCreate(LineageBase):
    merge_run_id: int | None = None


class Lineage(LineageBase, table=True):
    __table_args__ = (
        UniqueConstraint("parent_id", "child_id", "role"),
        Index("ix_lineage_child_parent", "child_id", "parent_id"),
        Index("ix_lineage_parent_child", "parent_id", "child_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    merge_run_id: int | None = Field(default=None, foreign_key="mergerun.id")
    created_at: datetime = _when()


class LineageEdge(LineageBase):
    depth: int


class LineagePublic(SQLModel):
    checkpoint_id: int
    ancestors: list[LineageEdge]
    descendants: list[LineageEdge]


# --- merge policies and runs -------------------------------------------------------------------


class MergePolicyBase(SQLModel):
    name: str = Field(min_length=1, max_length=255, unique=True)
    method: str = Field(default="", max_length=64)  # may be left out with ``mergekit``
    params: dict[str, Any] = _json()
    # e.g. {"base_id": 1, "tasks": [...], "tags": [...], "run": "...", "window": "newest_per_task"}
    selector: dict[str, Any] = _json()
    trigger: MergeTrigger = Field(default=MergeTrigger.manual, sa_type=String(16))
    cron: str | None = Field(default=None, max_length=128)
    evaluator: str | None = Field(default=None, max_length=128)
    enabled: bool = True
    # {"algorithm": "cma_es" | "m2n2", "budget": {...}, "space": {...}}: a search policy.
    search: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    # A mergekit YAML template instead of method + params (registry.services.mergekit_policies).
    mergekit: str | None = Field(default=None, max_length=256 * 1024, sa_type=Text)


class MergePolicyCreate(MergePolicyBase):
    pass


class MergePolicy(MergePolicyBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # A search policy's progress (archive / optimizer state, evaluations): resumes a killed run.
    search_state: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    created_at: datetime = _when()
    updated_at: datetime = _when()


class MergePolicyPublic(MergePolicyBase):
    id: int
    created_at: UtcDateTime
    updated_at: UtcDateTime


class MergeRunBase(SQLModel):
    policy_id: int | None = Field(default=None, foreign_key="mergepolicy.id", index=True)
    method: str = Field(max_length=64)
    params: dict[str, Any] = _json()
    base_id: int | None = Field(default=None, foreign_key="checkpoint.id")


class MergeRun(MergeRunBase, table=True):
    id: int | None = Field(default=None, primary_key=True)
    status: MergeRunStatus = Field(default=MergeRunStatus.queued, sa_type=String(16), index=True)
    # sha256 of (method, params, ordered inputs with weights): same inputs -> same run.
    idempotency_key: str = Field(max_length=64, unique=True)
    output_checkpoint_id: int | None = Field(default=None, foreign_key="checkpoint.id")
    orchestration_run_id: str | None = Field(default=None, max_length=64)
    mlflow_run_id: str | None = Field(default=None, max_length=64)
    # Scores the output: the policy's evaluator, or the one given to an ad-hoc POST /merges.
    evaluator: str | None = Field(default=None, max_length=128)
    error: str | None = None
    created_at: datetime = _when()
    started_at: datetime | None = _when(nullable=True)
    finished_at: datetime | None = _when(nullable=True)
    # Claim of the worker executing the run: a run is executed only under an unexpired lease.
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = _when(nullable=True, index=True)
    heartbeat_at: datetime | None = _when(nullable=True)
    attempts: int = Field(default=0)
    # A run from a mergekit YAML: the config with every model reference as ``ckreg/<id>``.
    mergekit_config: dict[str, Any] | None = Field(default=None, sa_type=JSON)


class MergeRunInput(SQLModel, table=True):
    """The ordered inputs of a merge run, each with its weight."""

    __table_args__ = (UniqueConstraint("merge_run_id", "position"),)

    id: int | None = Field(default=None, primary_key=True)
    merge_run_id: int = Field(foreign_key="mergerun.id", index=True)
    position: int
    checkpoint_id: int = Field(foreign_key="checkpoint.id", index=True)
    weight: float | None = None
    params: dict[str, Any] = _json()


# --- API tokens ------------------------------------------------------------------------------


class TokenScope(StrEnum):
    read = "read"
    write = "write"
    admin = "admin"


class ApiToken(SQLModel, table=True):
    """A bearer token; only the sha256 of its secret is stored."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=255)
    token_hash: str = Field(max_length=64, unique=True)
    scopes: list[str] = _json(factory=list)
    revoked: bool = False
    created_at: datetime = _when()
    last_used_at: datetime | None = _when(nullable=True)


from registry.search_models import MergeSearch  # noqa: E402, F401 - in the metadata with the rest
