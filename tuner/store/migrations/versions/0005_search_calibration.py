"""the learning-rate calibration of a search: its curve, finding and window (NULL for searches without one)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tuner_searches') as batch:
        batch.add_column(sa.Column('calibration', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tuner_searches') as batch:
        batch.drop_column('calibration')
