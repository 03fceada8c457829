"""Alembic migrations build exactly the schema of fleet/models.py, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

import fleet.db
from fleet.db import make_engine, migrate
from fleet.models import Base

MIGRATIONS = Path(fleet.db.__file__).parent / "migrations"


def _alembic(engine, action: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)


def test_migrate_creates_exactly_the_model_tables(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)

        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            drift = compare_metadata(MigrationContext.configure(connection), Base.metadata)
            revision = MigrationContext.configure(connection).get_current_revision()
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert drift == [], f"migrations and fleet/models.py differ: {drift}"
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
        assert revision == head

        migrate(engine)  # a second start changes nothing
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) == tables
    finally:
        engine.dispose()


def test_downgrade_removes_every_table_and_upgrade_restores_them(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        _alembic(engine, "downgrade", "base")
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) <= {"alembic_version"}
        _alembic(engine, "upgrade", "head")
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_env_reads_a_url_when_no_connection_is_given(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert set(inspect(connection).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()


def test_migration_0002_adds_and_removes_only_the_alerts_table(db_url):
    engine = make_engine(db_url)

    def alembic(action: str, revision: str) -> set[str]:
        _alembic(engine, action, revision)
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())

    try:
        migrate(engine)
        head = alembic("upgrade", "head")
        before = alembic("downgrade", "0001")
        after = alembic("upgrade", "0002")
    finally:
        engine.dispose()

    # tables of later revisions (0007's telemetry_rollups) go with the downgrade and are not back at 0002
    later = {"telemetry_rollups"}
    assert "alerts" in head and head - before == {"alerts"} | later and after == head - later
