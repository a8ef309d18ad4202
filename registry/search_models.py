"""The ``mergesearch`` table: one row per merge search of a search policy (migration 0007).

A row holds the search's progress (evaluations, best score, the resumable ``state``), its
worker lease, and ``active_policy_id``: the policy's id while the search is queued or running,
NULL otherwise. That column is unique, so the database itself refuses a second active search
of one policy, whichever worker or server asks.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, String, Text
from sqlmodel import Field, SQLModel

from registry.models import UtcDateTime, _when


class SearchStatus(StrEnum):
    queued = "queued"
    running = "running"
    finished = "finished"
    cancelled = "cancelled"
    failed = "failed"


ACTIVE = (SearchStatus.queued, SearchStatus.running)


class MergeSearch(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    policy_id: int = Field(foreign_key="mergepolicy.id", index=True)
    active_policy_id: int | None = Field(default=None, unique=True)
    status: SearchStatus = Field(default=SearchStatus.queued, sa_type=String(16), index=True)
    cancel_requested: bool = False
    algorithm: str = Field(max_length=16)
    evaluations: int = 0
    budget_evaluations: int = 0
    elapsed_s: float = 0.0
    best_score: float | None = None
    # The optimizer / archive, score history and MLflow parent run: a killed search resumes.
    state: dict[str, Any] | None = Field(default=None, sa_type=JSON)
    checkpoint_id: int | None = Field(default=None, foreign_key="checkpoint.id")
    error: str | None = Field(default=None, sa_type=Text)
    lease_owner: str | None = Field(default=None, max_length=128)
    lease_expires_at: datetime | None = _when(nullable=True)
    attempts: int = 0
    created_at: datetime = _when()
    updated_at: datetime = _when()
    started_at: datetime | None = _when(nullable=True)
    finished_at: datetime | None = _when(nullable=True)


class SearchCandidate(SQLModel):
    """One scored candidate: its number, score and seconds."""

    n: int
    score: float
    seconds: float


class MergeSearchPublic(SQLModel):
    """A search's status and progress (``GET /searches/{id}``)."""

    id: int
    policy_id: int
    status: SearchStatus
    algorithm: str
    cancel_requested: bool
    evaluations: int
    budget_evaluations: int
    budget_seconds: float | None
    elapsed_s: float
    best_score: float | None
    best: dict[str, Any] | None
    candidates: list[SearchCandidate]
    checkpoint_id: int | None
    error: str | None
    mlflow_run_id: str | None
    attempts: int
    resumed: bool = False
    created_at: UtcDateTime
    updated_at: UtcDateTime
    started_at: UtcDateTime | None
    finished_at: UtcDateTime | None


class MergeSearchPage(SQLModel):
    items: list[MergeSearchPublic]
    total: int
    limit: int
    offset: int
