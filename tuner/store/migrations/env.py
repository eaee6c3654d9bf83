"""Alembic environment: run programmatically by `tuner.store.migrate`, on the connection it hands over."""

from alembic import context

from tuner.store.schema import Base

VERSION_TABLE = "tuner_alembic_version"  # Optuna's own `alembic_version` lives in the same database


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:  # `alembic` CLI use, e.g. autogenerate during development
        from sqlalchemy import create_engine

        connection = create_engine(context.config.get_main_option("sqlalchemy.url")).connect()
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite",
                      include_name=lambda name, type_, parent: type_ != "table" or name.startswith("tuner_"))
    with context.begin_transaction():
        context.run_migrations()


run()
