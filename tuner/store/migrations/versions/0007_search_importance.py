"""the parameter importance of a search, per objective (NULL until the study's end computed it)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tuner_searches') as batch:
        batch.add_column(sa.Column('importance', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tuner_searches') as batch:
        batch.drop_column('importance')
