"""Daemon processes for tests: ``coleta run`` as a child, its log, and waiting on its events."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.test_cli import COLETA


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    log: Path

    def events(self) -> str:
        return self.log.read_text()

    def wait_event(self, event: str, *, count: int = 1, within_s: float = 20) -> str:
        """Wait until the log has ``count`` lines with ``"event":"<event>"``; return the log."""
        needle = f'"event":"{event}"'
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            text = self.events()
            if text.count(needle) >= count:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"no {event} after {within_s} s:\n{self.events()}")

    def stop(self, timeout_s: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def spawn(env: dict[str, str], log: Path, *args: str) -> Iterator[DaemonProcess]:
    """``coleta run ARGS`` with ``env``, its output in ``log``; killed if still running after."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*COLETA, "run", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            yield DaemonProcess(proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
