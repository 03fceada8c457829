"""The clock seam: components read time through a `Clock`, so tests drive windows and timers by hand.

    clock = SYSTEM_CLOCK                      # production: time.monotonic, time.time, time.sleep
    clock.wait(event, 2.0)                    # Event.wait(2.0): True when the event was set

    fake = FakeClock()                        # tests: time stands still until the test moves it
    monitor = DriftMonitor(reference, min_interval_s=0.05, clock=fake)
    fake.advance(0.06)                        # past the interval, without sleeping

What goes through a clock: windows (telemetry, the safety watch after a switch), intervals (drift's
binning rate), deadlines and timers, and the wall-clock stamps messages carry. What does not: the
latency of a real inference (`time.perf_counter` around the runtime call), and timeouts of real I/O
(a broker's acknowledgement, an HTTP request), which elapse in the world, not in the component.

`FakeClock` is the fake for this seam we own: a component's background thread that waits through
`clock.wait(event, timeout)` stays parked until the event is set or the test advances the fake time
past its deadline, and `wait_for_waiters()` tells the test when such a thread has parked, so a test
advances time at a known point instead of sleeping and hoping.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Where a component reads time; `SYSTEM_CLOCK` in production, a `FakeClock` in tests."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and deadlines)."""
        ...

    def time(self) -> float:
        """Seconds since the epoch (for timestamps that leave the process)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let `seconds` pass."""
        ...

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Block until `event` is set or `timeout` seconds passed; True when the event is set."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(seconds, 0.0))

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        return event.wait(timeout)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock that moves only when told to. Thread-safe.

    `advance(seconds)` moves both readings forward and wakes waiters whose deadline passed. `sleep()`
    advances the clock itself (the sleeping code is the only one that would notice the time pass, so
    a single-threaded loop with backoff runs instantly); a background thread should wait through
    `wait(event, timeout)`, which blocks until the event is set or a test advanced past the deadline.
    """

    def __init__(self, start: float = 1_000.0, *, wall_start: float = 1_700_000_000.0) -> None:
        self._offset = 0.0
        self._start = float(start)
        self._wall_start = float(wall_start)
        self._changed = threading.Condition()
        self._waiters = 0
        self.slept: list[float] = []  # every sleep() asked for, in order

    def monotonic(self) -> float:
        with self._changed:
            return self._start + self._offset

    def time(self) -> float:
        with self._changed:
            return self._wall_start + self._offset

    def advance(self, seconds: float) -> None:
        """Let `seconds` of fake time pass and wake the waiters."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._changed:
            self._offset += seconds
            self._changed.notify_all()

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(seconds, 0.0))

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        with self._changed:
            deadline = None if timeout is None else self._offset + max(timeout, 0.0)
            self._waiters += 1
            self._changed.notify_all()
            try:
                while not event.is_set():
                    if deadline is not None and self._offset >= deadline:
                        return False
                    # Event.set() does not notify this condition: look again every few milliseconds
                    # of real time; a set event ends the wait within that, an advance at once.
                    self._changed.wait(0.005)
                return True
            finally:
                self._waiters -= 1

    @property
    def waiters(self) -> int:
        """How many threads are blocked in `wait()` now."""
        with self._changed:
            return self._waiters

    def wait_for_waiters(self, count: int = 1, timeout: float = 10.0) -> None:
        """Block (in real time, at most `timeout`) until `count` threads are parked in `wait()`."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._waiters >= count, timeout):
                raise TimeoutError(f"{self._waiters} of {count} threads parked on the fake clock after {timeout} s")

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self.monotonic():.3f})"


__all__ = ["Clock", "FakeClock", "SYSTEM_CLOCK", "SystemClock"]
