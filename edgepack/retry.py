"""Retry with exponential backoff and full jitter: the one retry loop the agent (and anything else) uses.

    policy = RetryPolicy(base_s=0.5, max_s=30.0, max_attempts=5)
    backoff = policy.backoff()                 # stateful: next_delay(), reset() after progress, failures
    value = retry_call(fetch, policy=policy, retry_on=(OSError,), sleep=time.sleep)

Full jitter: the n-th delay (n = 0, 1, …) is drawn uniformly from [0, min(max_s, base_s * multiplier**n)].
Devices that lost the fleet at the same moment (an outage, a restart) would, with a plain doubling
delay, come back at the same moments and hit the server in lockstep; drawing each wait from the whole
window spreads them out while keeping the same mean growth ("Exponential Backoff And Jitter", AWS
Architecture Blog, 2015). Randomness, sleeping and the clock are parameters, so tests replay a
schedule exactly with a seeded `random.Random` and a fake sleep.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field


T = TypeVar("T")


class RetryStopped(Exception):
    """`should_stop` said stop before the call succeeded (e.g. the process is shutting down)."""


class RetryPolicy(BaseModel):
    """How long to wait between tries and when to give up (no limit when both limits are None)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_s: float = Field(0.5, ge=0, description="ceiling of the first delay")
    max_s: float = Field(30.0, ge=0, description="ceiling of any delay (wins over base_s)")
    multiplier: float = Field(2.0, ge=1, description="growth of the ceiling per failure")
    max_attempts: int | None = Field(None, ge=1, description="calls in all, the first included")
    deadline_s: float | None = Field(None, ge=0, description="no new try starts after this long since the first")

    def ceiling(self, failures: int) -> float:
        """The largest delay after `failures` consecutive failures (1 = after the first); jitter draws below it."""
        exponent = max(failures - 1, 0)
        # Past ~1000 doublings the float overflows; the cap has long been reached by then.
        if self.multiplier > 1 and exponent > 1000:
            return self.max_s
        return min(self.max_s, self.base_s * self.multiplier ** exponent)

    def backoff(self, rng: random.Random | None = None) -> "Backoff":
        return Backoff(self, rng or random.Random())


@dataclass
class Backoff:
    """The delays of one retry sequence; `reset()` after progress starts the growth over."""

    policy: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before the next try."""
        self.failures += 1
        return self.rng.uniform(0.0, self.policy.ceiling(self.failures))

    def reset(self) -> None:
        self.failures = 0

    def exhausted(self) -> bool:
        """True when the failures so far used up `max_attempts` (the first call counts as one)."""
        limit = self.policy.max_attempts
        return limit is not None and self.failures >= limit


def retry_call(call: Callable[[], T], *, policy: RetryPolicy, retry_on: tuple[type[BaseException], ...],
               sleep: Callable[[float], object] = time.sleep, clock: Callable[[], float] = time.monotonic,
               rng: random.Random | None = None, should_stop: Callable[[], bool] = lambda: False,
               on_retry: Callable[[BaseException, float], None] | None = None) -> T:
    """`call()` until it returns, retrying the exceptions in `retry_on` with jittered backoff.

    Re-raises the last exception when `max_attempts` calls failed or the next try would start after
    `deadline_s`; any other exception propagates at once. Raises RetryStopped when `should_stop()` is
    true before a try. `on_retry(exc, delay)` runs before each wait (to log it)."""
    backoff = policy.backoff(rng)
    started = clock()
    while True:
        if should_stop():
            raise RetryStopped("stopped before the call succeeded")
        try:
            return call()
        except retry_on as exc:
            delay = backoff.next_delay()
            late = policy.deadline_s is not None and clock() + delay - started > policy.deadline_s
            if backoff.exhausted() or late:
                raise
            if on_retry is not None:
                on_retry(exc, delay)
            sleep(delay)


def stoppable_sleep(should_stop: Callable[[], bool], *, step_s: float = 0.1,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], object] = time.sleep) -> Callable[[float], None]:
    """A sleep(delay) that returns early, within `step_s`, once `should_stop()` is true."""

    def wait(delay: float) -> None:
        deadline = clock() + delay
        while not should_stop():
            remaining = deadline - clock()
            if remaining <= 0:
                return
            sleep(min(step_s, remaining))

    return wait


__all__ = ["Backoff", "RetryPolicy", "RetryStopped", "retry_call", "stoppable_sleep"]
