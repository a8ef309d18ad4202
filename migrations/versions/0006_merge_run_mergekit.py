"""mergekit YAMLs: a merge run's resolved ``mergekit_config``, a policy's ``mergekit`` template.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 05:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("mergerun", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mergekit_config", sa.JSON(), nullable=True))
    with op.batch_alter_table("mergepolicy", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mergekit", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mergepolicy", schema=None) as batch_op:
        batch_op.drop_column("mergekit")
    with op.batch_alter_table("mergerun", schema=None) as batch_op:
        batch_op.drop_column("mergekit_config")
