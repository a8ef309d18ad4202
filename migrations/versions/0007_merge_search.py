"""Merge searches: one ``mergesearch`` row per search, with a unique ``active_policy_id`` so one
policy never has two searches queued or running at once.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 07:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    string = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        "mergesearch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("policy_id", sa.Integer(), nullable=False),
        sa.Column("active_policy_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("algorithm", string(length=16), nullable=False),
        sa.Column("evaluations", sa.Integer(), nullable=False),
        sa.Column("budget_evaluations", sa.Integer(), nullable=False),
        sa.Column("elapsed_s", sa.Float(), nullable=False),
        sa.Column("best_score", sa.Float(), nullable=True),
        sa.Column("state", sa.JSON(), nullable=True),
        sa.Column("checkpoint_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("lease_owner", string(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoint.id"],
            name=op.f("fk_mergesearch_checkpoint_id_checkpoint"),
        ),
        sa.ForeignKeyConstraint(
            ["policy_id"], ["mergepolicy.id"], name=op.f("fk_mergesearch_policy_id_mergepolicy")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mergesearch")),
        sa.UniqueConstraint("active_policy_id", name=op.f("uq_mergesearch_active_policy_id")),
    )
    op.create_index(op.f("ix_mergesearch_policy_id"), "mergesearch", ["policy_id"], unique=False)
    op.create_index(op.f("ix_mergesearch_status"), "mergesearch", ["status"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_mergesearch_status"), table_name="mergesearch")
    op.drop_index(op.f("ix_mergesearch_policy_id"), table_name="mergesearch")
    op.drop_table("mergesearch")
