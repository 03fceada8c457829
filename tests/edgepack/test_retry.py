"""edgepack.retry: exponential backoff with full jitter, replayable with a seeded random and a fake sleep."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from edgepack.retry import RetryPolicy, RetryStopped, retry_call, stoppable_sleep


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(times: int, exc: type[BaseException] = OSError):
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise exc(f"failure {calls['n']}")
        return "done"

    return call, calls


def test_delays_stay_under_the_doubling_ceiling_and_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, max_s=4.0)
    backoff = policy.backoff(random.Random(1))

    delays = [backoff.next_delay() for _ in range(8)]

    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert [policy.ceiling(n) for n in range(1, 9)] == ceilings
    assert all(0.0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)  # jittered, not a fixed schedule


def test_same_seed_same_schedule_and_reset_starts_over() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=60.0)
    first = policy.backoff(random.Random(7))
    second = policy.backoff(random.Random(7))

    assert [first.next_delay() for _ in range(5)] == [second.next_delay() for _ in range(5)]
    first.reset()
    assert first.failures == 0
    assert first.next_delay() <= policy.ceiling(1)


def test_devices_failing_together_do_not_retry_in_lockstep() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=60.0)
    rng = random.Random(42)
    third_delays = []
    for _ in range(200):
        backoff = policy.backoff(random.Random(rng.random()))
        third_delays.append([backoff.next_delay() for _ in range(3)][-1])

    # Full jitter spreads the third retry over the whole [0, 4 s] window, not one instant.
    quarters = [sum(1 for delay in third_delays if q <= delay / 4.0 < q + 0.25) for q in (0, 0.25, 0.5, 0.75)]
    assert all(count > 20 for count in quarters), quarters


def test_retry_call_retries_then_returns() -> None:
    fake = FakeTime()
    call, calls = failing(3)

    result = retry_call(call, policy=RetryPolicy(base_s=0.1, max_s=1.0), retry_on=(OSError,),
                        sleep=fake.sleep, clock=fake.clock, rng=random.Random(3))

    assert result == "done" and calls["n"] == 4 and len(fake.sleeps) == 3


def test_retry_call_gives_up_after_max_attempts_with_the_last_error() -> None:
    fake = FakeTime()
    call, calls = failing(10)

    with pytest.raises(OSError, match="failure 3"):
        retry_call(call, policy=RetryPolicy(max_attempts=3), retry_on=(OSError,), sleep=fake.sleep,
                   clock=fake.clock, rng=random.Random(0))

    assert calls["n"] == 3 and len(fake.sleeps) == 2


def test_retry_call_stops_at_the_deadline() -> None:
    fake = FakeTime()
    call, calls = failing(1000)

    with pytest.raises(OSError):
        retry_call(call, policy=RetryPolicy(base_s=1.0, max_s=1.0, deadline_s=10.0), retry_on=(OSError,),
                   sleep=fake.sleep, clock=fake.clock, rng=random.Random(5))

    assert fake.now <= 10.0 and calls["n"] == len(fake.sleeps) + 1 > 2


def test_other_exceptions_are_not_retried() -> None:
    fake = FakeTime()
    call, calls = failing(1, exc=KeyError)

    with pytest.raises(KeyError):
        retry_call(call, policy=RetryPolicy(), retry_on=(OSError,), sleep=fake.sleep, clock=fake.clock)

    assert calls["n"] == 1 and fake.sleeps == []


def test_should_stop_ends_the_loop_and_on_retry_sees_each_wait() -> None:
    fake = FakeTime()
    call, calls = failing(1000)
    seen: list[tuple[str, float]] = []

    with pytest.raises(RetryStopped):
        retry_call(call, policy=RetryPolicy(), retry_on=(OSError,), sleep=fake.sleep, clock=fake.clock,
                   should_stop=lambda: calls["n"] >= 2, on_retry=lambda exc, delay: seen.append((str(exc), delay)))

    assert calls["n"] == 2
    assert [message for message, _ in seen] == ["failure 1", "failure 2"]
    assert [delay for _, delay in seen] == fake.sleeps


def test_stoppable_sleep_returns_once_stopped() -> None:
    fake = FakeTime()
    wait = stoppable_sleep(lambda: fake.now >= 0.3, step_s=0.1, clock=fake.clock, sleep=fake.sleep)

    wait(60.0)

    assert fake.now == pytest.approx(0.3) and len(fake.sleeps) == 3


def test_stoppable_sleep_sleeps_the_whole_delay_when_not_stopped() -> None:
    fake = FakeTime()
    stoppable_sleep(lambda: False, step_s=0.4, clock=fake.clock, sleep=fake.sleep)(1.0)
    assert fake.now == pytest.approx(1.0) and fake.sleeps == pytest.approx([0.4, 0.4, 0.2])


def test_the_cap_wins_over_the_base_and_bad_values_are_refused() -> None:
    assert RetryPolicy(base_s=10.0, max_s=1.0).ceiling(1) == 1.0
    with pytest.raises(ValidationError):
        RetryPolicy(base_s=-1.0)
    with pytest.raises(ValidationError):
        RetryPolicy(multiplier=0.5)
