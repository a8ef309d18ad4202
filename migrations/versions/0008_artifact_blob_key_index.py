"""Index ``artifact.blob_key``: the "is this blob still referenced" lookups behind show, list,
upload, complete and gc scanned the whole artifact table.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 09:05:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("artifact", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_artifact_blob_key"), ["blob_key"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("artifact", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifact_blob_key"))
