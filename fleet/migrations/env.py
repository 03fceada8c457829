"""Alembic environment for the fleet database.

`fleet.db.migrate(engine)` hands over an open connection in `config.attributes["connection"]`; the
`alembic` command line instead names a database with `sqlalchemy.url` (in alembic.ini or `-x`).
Either way the target is `fleet.models.Base.metadata`, so `alembic check` reports drift between the
models and the migrations.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from fleet.db import normalize_url
from fleet.partitions import include_object
from fleet.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: pass a connection via fleet.db.migrate() or set sqlalchemy.url / -x url=…")
    return normalize_url(url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run_on(connection) -> None:
    # include_object: the telemetry key is a unique constraint on SQLite and an index on PostgreSQL's
    # partitioned table (fleet.partitions); everything else is compared as it is
    context.configure(connection=connection, target_metadata=target_metadata,
                      include_object=include_object(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = create_engine(_url())
    try:
        with engine.begin() as connection:
            _run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
