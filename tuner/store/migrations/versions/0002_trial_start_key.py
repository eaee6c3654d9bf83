"""trial start key: `start_trial` may be retried after a commit whose answer was lost

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tuner_trials') as batch:
        batch.add_column(sa.Column('start_key', sa.String(length=64), nullable=True))
    # rows written before this revision keep NULL: both databases allow any number of NULLs in a unique index
    op.create_index('ix_tuner_trials_start_key', 'tuner_trials', ['start_key'], unique=True)


def downgrade() -> None:
    op.drop_index('ix_tuner_trials_start_key', table_name='tuner_trials')
    with op.batch_alter_table('tuner_trials') as batch:
        batch.drop_column('start_key')
