"""Alembic migrations build exactly the schema of fleet/models.py, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
import pytest
from sqlalchemy import func, inspect, select

import fleet.db
from fleet.db import make_engine, migrate
from fleet.models import Base
from fleet.partitions import include_object

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
            context = MigrationContext.configure(connection, opts={"include_object": include_object(connection.dialect.name)})
            drift = compare_metadata(context, Base.metadata)
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


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_migration_0009_moves_postgresql_telemetry_into_day_partitions_and_back(db_url):
    """0009 turns an existing telemetry table into day partitions with every row kept (a partition for each
    day the rows cover), ids carry on from the old sequence, and the downgrade puts the rows back."""
    import datetime as dt

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from fleet import partitions
    from fleet.models import Device, TelemetryWindow

    engine = make_engine(db_url)
    now = dt.datetime.now(dt.timezone.utc)
    days = [now - dt.timedelta(days=d) for d in (12, 3, 0)]
    try:
        migrate(engine)
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
        _alembic(engine, "downgrade", "0008")
        with Session(engine) as session:
            session.add(Device(id="d-1", profile="rpi5", labels={}, credential_hash="0" * 64, online=True))
            session.flush()
            for i, at in enumerate(days):
                session.add(TelemetryWindow(device_id="d-1", window_key=f"w-{i}", received_at=at, window_s=10.0,
                                            inferences=1, errors=0, drift={}, payload={}))
            session.commit()
            old_ids = session.scalars(select(TelemetryWindow.id).order_by(TelemetryWindow.id)).all()
        _alembic(engine, "upgrade", "head")
        with Session(engine) as session:
            connection = session.connection()
            assert partitions.is_partitioned(connection)
            names = {p.name for p in partitions.day_partitions(connection)}
            assert {partitions.partition_for(at.date()).name for at in days} <= names
            placed = dict(session.execute(text("SELECT window_key, tableoid::regclass::text FROM telemetry")).all())
            assert placed == {f"w-{i}": f"{partitions.SCHEMA}.{partitions.partition_for(at.date()).name}"
                              for i, at in enumerate(days)}
            assert session.scalars(select(TelemetryWindow.id).order_by(TelemetryWindow.id)).all() == old_ids
            session.add(TelemetryWindow(device_id="d-1", window_key="w-new", received_at=now, window_s=10.0,
                                        inferences=1, errors=0, drift={}, payload={}))
            session.commit()
            assert session.scalar(select(TelemetryWindow.id).where(TelemetryWindow.window_key == "w-new")) > max(old_ids)
        _alembic(engine, "downgrade", "0008")
        with Session(engine) as session:
            assert not partitions.is_partitioned(session.connection())
            assert session.scalar(select(func.count()).select_from(TelemetryWindow)) == 4
            assert session.scalar(text(
                "SELECT count(*) FROM pg_namespace WHERE nspname = :schema"), {"schema": partitions.SCHEMA}) == 0
        _alembic(engine, "upgrade", "head")
    finally:
        engine.dispose()
