"""The throwaway PostgreSQL server the test session starts when EDGEPACK_TEST_POSTGRES_URL is unset."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from testbeds import postgres
from testbeds.postgres import PostgresServer, find_postgres_bin


@pytest.mark.e2e
def test_a_server_starts_serves_and_leaves_nothing_behind() -> None:
    with PostgresServer() as server:
        folder, process = server.dir, server.process
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/test"
        with psycopg.connect(server.url, autocommit=True) as connection:
            connection.execute("CREATE TABLE t (n int)")
            connection.execute("INSERT INTO t VALUES (41), (1)")
            assert connection.execute("SELECT sum(n) FROM t").fetchone() == (42,)
            data_directory = connection.execute("SELECT current_setting('data_directory')").fetchone()[0]
        assert Path(data_directory) == server.data_dir
        if os.geteuid() == 0:
            # PostgreSQL will not run as root: the server runs as the postgres account, which owns the folder.
            assert server.run_as is not None and folder.stat().st_uid == server.run_as.uid
    assert process.poll() is not None
    assert not folder.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.url, connect_timeout=2)


def test_the_server_binaries_are_found_here() -> None:
    bin_dir = find_postgres_bin()
    assert (bin_dir / "initdb").is_file() and (bin_dir / "postgres").is_file()


def test_no_server_anywhere_is_one_line_saying_what_to_install(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(postgres.shutil, "which", lambda name: None)
    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setattr(postgres, "PIP_BUILDS", ())
    with pytest.raises(FileNotFoundError) as raised:
        find_postgres_bin()
    message = str(raised.value)
    assert "\n" not in message
    assert "apt-get install -y postgresql" in message and "EDGEPACK_TEST_POSTGRES_URL" in message
