"""The worker supervisor on its own: restarts with backoff, relays stderr, kills what hangs."""

from __future__ import annotations

import logging
import sys

import anyio
import pytest

from daemon.app._workers import RESTART_BACKOFF, STABLE_S, Workers
from daemon.platform.retry import Backoff
from tests._proc import alive

pytestmark = pytest.mark.anyio

FAST = Backoff(first_s=0.05, cap_s=0.2)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


def test_the_restart_policy_is_one_second_doubling_to_thirty() -> None:
    delays = [RESTART_BACKOFF.delay(n) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert STABLE_S == 60.0


async def test_a_crashing_worker_is_restarted_with_growing_waits_and_its_stderr_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    crash = "import sys; sys.stderr.write('Traceback: boom\\n'); sys.exit(3)"
    workers = Workers(2, lambda index: python(crash), backoff=FAST)
    caplog.set_level(logging.INFO, logger="coleta.workers")
    async with anyio.create_task_group() as tg:
        await tg.start(workers.run)  # started: the worker exited once (it never got ready)
        with anyio.fail_after(20):
            while len(records(caplog, "worker.exited")) < 10:  # noqa: ASYNC110 (polling the log)
                await anyio.sleep(0.02)
        assert workers.health().ok is False
        assert "worker 1 exited (exit code 3), restarting" in workers.health().detail
        await workers.stop()
        with anyio.fail_after(5):
            await workers.wait()
    for index in (1, 2):  # both at once, each on its own schedule
        exited = [r for r in records(caplog, "worker.exited") if getattr(r, "worker") == index]  # noqa: B009
        assert [r.levelname for r in exited[:4]] == ["ERROR"] * 4
        assert [getattr(r, "exit_code") for r in exited[:4]] == [3] * 4  # noqa: B009
        assert [getattr(r, "restart_in_s") for r in exited[:4]] == [0.05, 0.1, 0.2, 0.2]  # noqa: B009
    stderr = records(caplog, "worker.stderr")
    assert getattr(stderr[0], "text") == "Traceback: boom"  # noqa: B009
    assert {getattr(r, "worker") for r in stderr} == {1, 2}  # noqa: B009
    started = len(records(caplog, "worker.started"))
    await anyio.sleep(0.3)
    assert len(records(caplog, "worker.started")) == started  # none after stop


async def test_a_worker_that_does_not_stop_is_killed_after_close_s(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Says ready, then ignores its channel and SIGTERM alike.
    hang = (
        "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " os.write(0, b'ready\\n'); time.sleep(60)"
    )
    workers = Workers(2, lambda index: python(hang), close_s=0.5)
    caplog.set_level(logging.INFO, logger="coleta.workers")
    async with anyio.create_task_group() as tg:
        await tg.start(workers.run)
        pids = list(workers.pids.values())
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
        assert workers.health().detail == "2 running"
        started = anyio.current_time()
        tg.cancel_scope.cancel()  # as a signal during start-up would
    assert anyio.current_time() - started < 3
    assert not any(alive(pid) for pid in pids)
    assert workers.pids == {}
