"""``coleta`` as a user runs it, for tests: commands as child processes (``coleta``), the
daemon as a child (``spawn``), its log, and waiting on its events or its health."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

COLETA = [sys.executable, "-m", "daemon"]


def coleta(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COLETA, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else clean_env(),
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NATS_URL", "DATABASE_URL", "COLETA_CONFIG", "EXTERNAL_API_URL")
        and not k.startswith("OTEL_")
    }
    env.update(extra)
    return env


def alive(pid: int) -> bool:
    """Zombies count as dead: here PID 1 may never reap reparented servers."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


#: How often ``wait_healthy`` asks ``coleta health`` while the daemon starts, and once it has
#: logged that it is ready: each ask is a Python process (most of a CPU second), and asking
#: back to back takes the CPU the daemon needs to start.
ASK_WHILE_STARTING_S, ASK_WHEN_READY_S = 1.0, 0.25


def wait_healthy(
    env: dict[str, str], proc: subprocess.Popen[str], log: Path, within_s: float = 60
) -> None:
    """Wait until ``coleta health`` exits 0, as a user would check; asked at once when the
    daemon logs ``daemon.ready``, about once a second before."""
    deadline = time.monotonic() + within_s
    asked_at = -float("inf")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{log.read_text()}")
        ready = log.exists() and '"event":"daemon.ready"' in log.read_text(errors="replace")
        if time.monotonic() - asked_at >= (ASK_WHEN_READY_S if ready else ASK_WHILE_STARTING_S):
            asked_at = time.monotonic()
            if coleta("health", env=env, timeout=10).returncode == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"daemon not healthy after {within_s} s:\n{log.read_text()}")


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
