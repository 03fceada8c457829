"""Which replica runs the rollout controller (and the retention pass): exactly one at a time.

On PostgreSQL the leader holds a session-level advisory lock (`pg_try_advisory_lock`) on a connection of its
own, outside the pool. PostgreSQL releases the lock when that session ends — the process exits, is killed
with SIGKILL, or loses its connection — so another replica takes over at its next try (every controller
interval, one second by default). The holder checks its connection before every tick it runs; a leader whose
connection broke steps down before doing anything, so two controllers never tick at once on one database.
(Even if they did, every transition is a conditional UPDATE on (status, current_wave) and every desired
state is stored before it is published: a device still could not get two different states for one wave.)

SQLite serves one process (its data folder): that process always leads.
"""

from __future__ import annotations

import logging
import threading
import zlib
from typing import Any

from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

# One fixed key per purpose, derived from a name so it is stable across versions and readable in pg_locks.
CONTROLLER_LOCK = zlib.crc32(b"edgepack-rollout-controller")


class Leadership:
    """`is_leader()` answers, cheaply and without blocking, whether this replica may run the controller now."""

    def __init__(self, engine: Engine, *, key: int = CONTROLLER_LOCK, name: str = "rollout controller") -> None:
        self.engine = engine
        self.key = key
        self.name = name
        self.single = engine.dialect.name != "postgresql"
        self._connection: Any = None
        self._lock = threading.Lock()
        self.leading = self.single
        self.changes = 0  # times this replica became leader

    def is_leader(self) -> bool:
        if self.single:
            return True
        with self._lock:
            if self._connection is not None:
                if self._alive():
                    return True
                self._drop("its database connection broke")
            return self._try_acquire()

    def _alive(self) -> bool:
        try:
            self._connection.exec_driver_sql("SELECT 1")
            return True
        except Exception:
            return False

    def _try_acquire(self) -> bool:
        try:
            connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except Exception as exc:
            log.warning("leadership: cannot reach the database (%s)", str(exc).splitlines()[0][:200])
            return False
        try:
            got = bool(connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({int(self.key)})").scalar())
        except Exception:
            connection.close()
            return False
        if not got:
            connection.close()
            if self.leading:
                self.leading = False
            return False
        # keep the connection out of the pool for as long as we lead: the lock lives with its session
        self._connection = connection
        self.leading = True
        self.changes += 1
        log.info("this replica now runs the %s (advisory lock %d)", self.name, self.key)
        return True

    def _drop(self, why: str) -> None:
        log.warning("this replica stops running the %s: %s", self.name, why)
        try:
            self._connection.invalidate()
        except Exception:
            pass
        self._connection = None
        self.leading = False

    def release(self) -> None:
        """Give the lock up (a clean shutdown): another replica takes over at once instead of at its next try."""
        if self.single:
            return
        with self._lock:
            if self._connection is None:
                return
            try:
                self._connection.exec_driver_sql(f"SELECT pg_advisory_unlock({int(self.key)})")
                self._connection.close()
            except Exception:
                pass
            self._connection = None
            self.leading = False


__all__ = ["CONTROLLER_LOCK", "Leadership"]
