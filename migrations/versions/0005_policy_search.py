"""Search policies: a policy's ``search`` config and its resumable ``search_state``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 04:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mergepolicy", schema=None) as batch_op:
        batch_op.add_column(sa.Column("search", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("search_state", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mergepolicy", schema=None) as batch_op:
        batch_op.drop_column("search_state")
        batch_op.drop_column("search")
