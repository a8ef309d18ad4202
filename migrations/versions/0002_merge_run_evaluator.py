"""Merge runs remember their evaluator (ad-hoc ``POST /merges`` runs have no policy to ask).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 16:05:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('mergerun', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('evaluator', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True)
        )
    # Runs made by a policy before this revision score with the policy's evaluator.
    op.execute(
        "UPDATE mergerun SET evaluator = (SELECT mergepolicy.evaluator FROM mergepolicy"
        " WHERE mergepolicy.id = mergerun.policy_id) WHERE policy_id IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table('mergerun', schema=None) as batch_op:
        batch_op.drop_column('evaluator')
