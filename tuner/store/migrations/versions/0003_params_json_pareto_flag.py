"""hyperparameters only in `params` (no column per hyperparameter); stored Pareto flags of trials and of
their evaluated checkpoints (candidates)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30

A method may declare any hyperparameters, so the per-hyperparameter columns of 0001 go: `params` (JSON) has
always held the same values. Pareto flags are derived once by the study driver and read by every view; for the
studies already in the store the trials' flags are computed here from their stored objectives (their
checkpoints' flags are derived when such a study is resumed).
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

LEGACY_COLUMNS = ('lr', 'epochs', 'retain_weight')  # 0001's columns, named as they were created


def upgrade() -> None:
    with op.batch_alter_table('tuner_trials') as batch:
        for column in LEGACY_COLUMNS:
            batch.drop_column(column)
        batch.add_column(sa.Column('pareto', sa.Boolean(), nullable=True))
    with op.batch_alter_table('tuner_curve') as batch:
        batch.add_column(sa.Column('pareto', sa.Boolean(), nullable=True))
    _flag_existing_fronts(op.get_bind())


def _flag_existing_fronts(conn) -> None:
    studies = conn.execute(sa.text("SELECT id, spec FROM tuner_studies")).all()
    for study_id, spec in studies:
        spec = _json(spec)
        objectives = list((spec or {}).get('objectives') or ['forget_gap', 'utility_drop'])
        rows = [{"id": r.id, "unit": r.unit, "status": r.status, "objectives": _json(r.objectives) or {}}
                for r in conn.execute(sa.text(
                    "SELECT t.id, s.unit, t.status, t.objectives FROM tuner_trials t "
                    "JOIN tuner_searches s ON s.id = t.search_id WHERE s.study_id = :sid"), {"sid": study_id})]
        front = _front_ids(rows, objectives)
        for row in rows:
            conn.execute(sa.text("UPDATE tuner_trials SET pareto = :flag WHERE id = :id"),
                         {"flag": row["id"] in front, "id": row["id"]})


# A frozen copy of tuner.results.pareto as it was when this revision was written: a migration means the same thing on
# every store it ever upgrades, so it never imports the package's live code.
def _dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _front_ids(rows, objectives) -> set:
    """Ids of the rows on their search unit's Pareto front of the minimised `objectives`; rows of unfinished
    trials or without every objective value take no part (duplicates of a front point are all kept)."""
    by_unit = {}
    for row in rows:
        values = [row["objectives"].get(o) for o in objectives]
        if row["status"] in ("completed", "stopped_at_target") and all(v is not None for v in values):
            by_unit.setdefault(row["unit"], []).append((row["id"], values))
    return {i for members in by_unit.values() for i, p in members
            if not any(_dominates(q, p) for j, q in members if j != i)}


def _json(value):
    """JSON columns come back parsed on PostgreSQL and as text from a raw SQLite query."""
    import json

    return json.loads(value) if isinstance(value, str) else value


def downgrade() -> None:
    with op.batch_alter_table('tuner_curve') as batch:
        batch.drop_column('pareto')
    with op.batch_alter_table('tuner_trials') as batch:
        batch.drop_column('pareto')
        for column in LEGACY_COLUMNS:
            batch.add_column(sa.Column(column, sa.Float(), nullable=True))
