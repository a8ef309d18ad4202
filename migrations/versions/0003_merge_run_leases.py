"""Merge runs carry a worker lease (owner, heartbeat, expiry) so many workers run each once.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 11:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('mergerun', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True)
        )
        batch_op.add_column(
            sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column('attempts', sa.Integer(), nullable=False, server_default='0')
        )
        batch_op.create_index(
            batch_op.f('ix_mergerun_lease_expires_at'), ['lease_expires_at'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('mergerun', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_mergerun_lease_expires_at'))
        batch_op.drop_column('attempts')
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('lease_owner')
