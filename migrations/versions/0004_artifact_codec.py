"""Stored weights may be compressed at rest: codec, stored size and delta base per file row.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 11:21:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                'codec',
                sqlmodel.sql.sqltypes.AutoString(length=32),
                nullable=False,
                server_default='raw',
            )
        )
        batch_op.add_column(sa.Column('stored_size', sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column(
                'codec_base_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True
            )
        )
    # Rows written before this revision are stored as they are.
    op.execute("UPDATE artifact SET stored_size = size WHERE stored_size IS NULL")


def downgrade() -> None:
    with op.batch_alter_table('artifact', schema=None) as batch_op:
        batch_op.drop_column('codec_base_sha256')
        batch_op.drop_column('stored_size')
        batch_op.drop_column('codec')
