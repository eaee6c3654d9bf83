"""standard errors of a curve point's subsampled figures (NULL where a set was scored whole)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

COLUMNS = ('forget_nll_se', 'unseen_nll_se', 'retain_nll_se', 'general_nll_se', 'forget_gap_se', 'utility_drop_se')


def upgrade() -> None:
    with op.batch_alter_table('tuner_curve') as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tuner_curve') as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
