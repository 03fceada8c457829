"""The clock seam: the system clock reads the real one; the fake moves only when told, and parks waiting threads."""

from __future__ import annotations

import threading
import time

import pytest

from edgepack.clock import SYSTEM_CLOCK, Clock, FakeClock


def test_the_system_clock_reads_time_and_waits_on_the_event():
    event = threading.Event()
    event.set()

    assert isinstance(SYSTEM_CLOCK, Clock) and isinstance(FakeClock(), Clock)
    assert SYSTEM_CLOCK.monotonic() <= time.monotonic() and SYSTEM_CLOCK.time() <= time.time()
    assert SYSTEM_CLOCK.wait(event, 5.0) is True
    assert SYSTEM_CLOCK.wait(threading.Event(), 0.0) is False


def test_the_fake_moves_only_when_advanced_or_slept():
    clock = FakeClock(start=50.0, wall_start=1_000.0)

    assert (clock.monotonic(), clock.time()) == (50.0, 1_000.0)
    clock.advance(2.5)
    clock.sleep(0.5)
    assert (clock.monotonic(), clock.time()) == (53.0, 1_003.0) and clock.slept == [0.5]
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_a_thread_waiting_on_the_fake_wakes_when_time_passes_its_deadline():
    clock = FakeClock()
    event = threading.Event()
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(clock.wait(event, 10.0)))
    waiter.start()

    clock.wait_for_waiters(1)
    clock.advance(9.0)
    assert clock.waiters == 1 and results == []  # not yet: 1 s of fake time to go
    clock.advance(1.0)
    waiter.join(10)

    assert results == [False] and clock.waiters == 0


def test_a_thread_waiting_on_the_fake_wakes_when_the_event_is_set():
    clock = FakeClock()
    event = threading.Event()
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(clock.wait(event, None)))
    waiter.start()

    clock.wait_for_waiters(1)
    event.set()
    waiter.join(10)

    assert results == [True] and clock.monotonic() == 1_000.0  # no fake time passed


def test_waiting_for_waiters_that_never_come_says_so():
    with pytest.raises(TimeoutError, match="0 of 1 threads"):
        FakeClock().wait_for_waiters(1, timeout=0.05)
