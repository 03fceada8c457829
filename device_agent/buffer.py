"""A small append-only buffer on disk for messages the broker could not take yet (telemetry while offline).

    buffer = DiskBuffer(state_dir / "telemetry.buffer", max_bytes=4 << 20)
    buffer.append(payload)                  # one JSON document (bytes); fsync'd before it returns
    for seq, payload in buffer.peek(32):    # oldest first
        ...
    buffer.remove_through(seq)              # delivered: forget everything up to and including seq

The file holds one JSON line per message, `{"seq": N, "payload": {...}}`, so a reader needs nothing
but `json`. Appends are `write` + `fsync` on a file opened for appending; removals and the cap rewrite
the file through a temp file and `os.replace`, so a crash leaves the old or the new file, never a mix.
A crash in the middle of an append leaves a torn last line: `DiskBuffer` drops it when it opens the
file (and rewrites the file, so the next append does not glue onto it).

Size cap: when an append would take the file past `max_bytes`, the oldest messages are dropped until
the file is at most three quarters full (so the rewrite is paid once per many appends, not per append)
and `dropped` counts them. The newest data wins: after a long outage the fleet gets the most recent
windows. A message bigger than the cap on its own is refused with ValueError.

Thread-safe; the contents are mirrored in memory (the cap bounds that too).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from pathlib import Path

from edgepack.files import atomic_write

log = logging.getLogger(__name__)

_PREFIX = b'{"seq":'
_MIDDLE = b',"payload":'


class DiskBuffer:
    """Messages waiting for delivery, oldest first, durable across restarts and capped in size."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.dropped = 0  # messages dropped to stay under max_bytes since this object was created
        self.torn = 0  # damaged lines found when opening (a crash mid-append)
        self._lock = threading.Lock()
        self._entries: deque[tuple[int, bytes]] = deque()  # (seq, the whole line with its newline)
        self._size = 0
        self._next_seq = 1
        self._load()

    # -- reading -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._size

    def peek(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` (seq, payload) pairs, oldest first, without removing them."""
        with self._lock:
            result = []
            for seq, line in self._entries:
                if len(result) >= limit:
                    break
                result.append((seq, _payload_of(line)))
            return result

    # -- writing -------------------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        """Store one JSON document durably; returns its seq. Drops the oldest messages past the cap."""
        payload = bytes(payload)
        if b"\n" in payload or b"\r" in payload:
            raise ValueError("a buffered payload must be one line of JSON")
        with self._lock:
            seq = self._next_seq
            line = _PREFIX + str(seq).encode() + _MIDDLE + payload + b"}\n"
            if len(line) > self.max_bytes:
                raise ValueError(f"a message of {len(line)} bytes does not fit a buffer of {self.max_bytes} bytes")
            self._next_seq += 1
            if self._size + len(line) > self.max_bytes:
                budget = self.max_bytes * 3 // 4 - len(line)
                dropped = 0
                while self._entries and self._size > max(budget, 0):
                    _, old = self._entries.popleft()
                    self._size -= len(old)
                    dropped += 1
                self.dropped += dropped
                log.warning("%s is full (%d bytes): dropped the %d oldest messages (%d so far)",
                            self.path.name, self.max_bytes, dropped, self.dropped)
                self._entries.append((seq, line))
                self._size += len(line)
                self._rewrite()
                return seq
            self._entries.append((seq, line))
            self._size += len(line)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            return seq

    def remove_through(self, seq: int) -> int:
        """Forget every message with a seq up to and including `seq`; returns how many went."""
        with self._lock:
            removed = 0
            while self._entries and self._entries[0][0] <= seq:
                _, line = self._entries.popleft()
                self._size -= len(line)
                removed += 1
            if removed:
                self._rewrite()
            return removed

    # -- the file ------------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        damaged = False
        for raw in data.split(b"\n"):
            if not raw:
                continue
            try:
                document = json.loads(raw)
                seq = int(document["seq"])
                payload = json.dumps(document["payload"], separators=(",", ":")).encode()
            except (ValueError, KeyError, TypeError):
                self.torn += 1
                damaged = True
                continue
            line = _PREFIX + str(seq).encode() + _MIDDLE + payload + b"}\n"
            self._entries.append((seq, line))
            self._size += len(line)
            self._next_seq = max(self._next_seq, seq + 1)
        if damaged or (data and not data.endswith(b"\n")):
            log.warning("%s: dropped %d damaged line(s) (an append cut short by a crash)", self.path, self.torn)
            self._rewrite()

    def _rewrite(self) -> None:
        """Replace the file with the entries in memory (lock held)."""
        if not self._entries:
            self.path.unlink(missing_ok=True)
            return
        atomic_write(self.path, b"".join(line for _, line in self._entries))


def _payload_of(line: bytes) -> bytes:
    start = line.index(_MIDDLE) + len(_MIDDLE)
    return line[start:-2]  # without the closing brace and the newline
