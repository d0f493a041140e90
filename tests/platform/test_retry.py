"""Retries inside the process: one backoff policy, one loop, a predicate, a deadline."""

from __future__ import annotations

import anyio
import pytest

from daemon.platform import retry as retry_module
from daemon.platform.retry import Backoff, Retrying, retry

pytestmark = pytest.mark.anyio


def test_the_backoff_doubles_up_to_its_cap() -> None:
    doubling = Backoff(first_s=1.0, cap_s=30.0)
    assert [doubling.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert doubling.delay(0) == 1.0  # an attempt before the first waits as long as the first


def test_full_jitter_stays_between_zero_and_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    jittered = Backoff(first_s=0.5, cap_s=20.0, jitter=True)
    for attempt in range(0, 12):
        ceiling = min(20.0, 0.5 * 2 ** max(0, attempt - 1))
        samples = [jittered.delay(attempt) for _ in range(50)]
        assert all(0.0 <= s <= ceiling for s in samples), (attempt, samples)
    assert len({jittered.delay(10) for _ in range(20)}) > 1  # spread out, not one value
    monkeypatch.setattr(retry_module._jitter, "uniform", lambda low, high: high)
    assert [jittered.delay(n) for n in (1, 2, 7)] == [0.5, 1.0, 20.0]
    monkeypatch.setattr(retry_module._jitter, "uniform", lambda low, high: low)
    assert jittered.delay(5) == 0.0


class Flaky:
    """Fails with ``errors`` in turn, then answers ``"done"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_retries_while_the_predicate_says_the_error_may_pass() -> None:
    flaky = Flaky(TimeoutError("slow"), ConnectionError("reset"))
    seen: list[Retrying] = []
    result = await retry(
        flaky,
        retry_on=lambda exc: isinstance(exc, TimeoutError | ConnectionError),
        backoff=Backoff(first_s=0.01, cap_s=0.02),
        on_retry=seen.append,
    )
    assert (result, flaky.calls) == ("done", 3)
    assert [(r.attempt, type(r.error), r.delay_s) for r in seen] == [
        (1, TimeoutError, 0.01),
        (2, ConnectionError, 0.02),
    ]


async def test_an_error_the_predicate_refuses_leaves_at_once() -> None:
    flaky = Flaky(ValueError("bad"), TimeoutError("slow"))
    with pytest.raises(ValueError, match="bad"):
        await retry(
            flaky,
            retry_on=lambda exc: isinstance(exc, TimeoutError),
            backoff=Backoff(first_s=0.01, cap_s=0.01),
        )
    assert flaky.calls == 1


async def test_past_the_deadline_the_last_error_is_raised() -> None:
    flaky = Flaky(*[TimeoutError(f"slow {n}") for n in range(100)])
    waits: list[tuple[float, float]] = []  # (when a wait began, how long it was to be)

    async def sleep(delay_s: float) -> None:
        waits.append((anyio.current_time(), delay_s))
        await anyio.sleep(delay_s)

    deadline = anyio.current_time() + 0.2
    with pytest.raises(TimeoutError, match="slow"):
        await retry(
            flaky,
            retry_on=lambda exc: True,
            backoff=Backoff(first_s=0.05, cap_s=0.05),
            deadline=deadline,
            wait=sleep,
        )
    # Never a wait planned to end past the deadline (how late the loop wakes is the machine's).
    assert waits
    assert all(began + delay_s < deadline for began, delay_s in waits)
    assert flaky.calls == len(waits) + 1
    assert 2 <= flaky.calls <= 4


async def test_the_wait_can_be_replaced_and_cancelled() -> None:
    waits: list[float] = []

    async def stop_after_two(delay_s: float) -> None:
        waits.append(delay_s)
        if len(waits) == 2:
            raise RuntimeError("asked to stop")

    with pytest.raises(RuntimeError, match="asked to stop"):
        await retry(
            Flaky(*[OSError("down")] * 5),
            retry_on=lambda exc: True,
            backoff=Backoff(first_s=1.0, cap_s=4.0),
            wait=stop_after_two,
        )
    assert waits == [1.0, 2.0]
    with anyio.move_on_after(0.1) as scope:
        await retry(
            Flaky(*[OSError("down")] * 5),
            retry_on=lambda exc: True,
            backoff=Backoff(first_s=60.0, cap_s=60.0),
        )
    assert scope.cancelled_caught
