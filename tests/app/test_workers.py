"""``coleta run --workers N``: N worker processes share the runs, live and die with the main one,
which ticks and answers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests._proc import DaemonProcess, alive, clean_env, coleta, spawn, write_config
from tests.fix_http import LocalAPI
from tests.fix_pg import server_state_dir

#: Four sources, so runs can go on at once in both processes (one run per source at a time).
SOURCES = ("s0", "s1", "s2", "s3")


def config_text(api: LocalAPI, bus_prefix: str, db_schema: str, *extra: str) -> str:
    """One run at a time per process, each taking a while: both processes get work."""
    lines = [
        f'bus_prefix = "{bus_prefix}"',
        f'database_schema = "{db_schema}"',
        "max_concurrent_fetches = 1",
        "shutdown_grace_s = 5",
        *extra,
    ]
    for name in SOURCES:
        lines += ["[[sources]]", f'name = "{name}"', f'url = "{api.url("/slow")}"']
        lines += ['schedule = "0 0 1 1 *"']
    return "\n".join(lines) + "\n"


def events(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    needle = f'"event":"{event}"'
    return [json.loads(line) for line in daemon.events().splitlines() if needle in line]


def wait_until(check: Callable[[], Any], what: str, within_s: float = 30) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out after {within_s} s waiting for {what}")


def started_pids(daemon: DaemonProcess) -> list[int]:
    return [event["pid"] for event in events(daemon, "worker.started")]


def trigger_all(env: dict[str, str]) -> None:
    for name in SOURCES:
        result = coleta("trigger", name, env=env)
        assert result.returncode == 0, result.stdout + result.stderr


def hold_a_run_in_each_worker(api: LocalAPI, gate: threading.Event) -> None:
    """Wait until the API holds two requests at once, then let them go. Each process fetches
    one run at a time, so two held at once are one per worker, whatever the machine's speed
    (a worker that ends each run before the next trigger could otherwise take them all)."""
    wait_until(lambda: len(api.hits("/slow")) >= 2, "a run held in each worker")
    gate.set()


def stored(db: psycopg.Connection[Any]) -> int:
    row = db.execute("SELECT count(*) FROM collected_data").fetchone()
    return int(row[0]) if row else 0


def test_two_workers_share_the_runs_and_stop_with_the_main_process(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    gate = threading.Event()
    api.route("/slow", json={"slow": True}, gate=gate)
    config = write_config(tmp_path / "coleta.toml", config_text(api, bus_prefix, db_schema))
    # fetch.done is a debug line: which worker fetched each run.
    env = clean_env(
        NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config), LOG_LEVEL="debug"
    )
    with spawn(env, tmp_path / "daemon.log", "--workers", "2") as main:
        main.wait_event("workers.ready")
        (ready,) = [e for e in events(main, "daemon.ready") if "worker" not in e]
        assert (ready["roles"], ready["workers"]) == (["service", "ticker"], 2)
        pids = started_pids(main)
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
        worker_ready = [e for e in events(main, "daemon.ready") if "worker" in e]
        assert {e["worker"]: e["roles"] for e in worker_ready} == {
            1: ["writer", "fetcher"],
            2: ["writer", "fetcher"],
        }
        health = coleta("health", "--json", env=env)
        assert health.returncode == 0, health.stdout + health.stderr
        assert json.loads(health.stdout)["checks"]["workers"] == {"ok": True, "detail": "2 running"}

        trigger_all(env)
        hold_a_run_in_each_worker(api, gate)
        wait_until(lambda: stored(db_conn) == len(SOURCES), "a row per run")
        # Both workers fetched, the main process none; each line says which worker wrote it.
        assert {e.get("worker") for e in events(main, "fetch.done")} == {1, 2}
        statuses = db_conn.execute("SELECT DISTINCT status FROM collection_runs").fetchall()
        assert statuses == [("stored",)]

        started = time.monotonic()
        main.proc.send_signal(signal.SIGTERM)
        assert main.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 5 + 2  # within shutdown_grace_s
        assert not any(alive(pid) for pid in pids)
        assert {e.get("worker") for e in events(main, "daemon.stopped")} == {None, 1, 2}
        stopped = events(main, "worker.stopped")
        assert sorted((e["pid"], e["exit_code"]) for e in stopped) == sorted((p, 0) for p in pids)


def test_workers_exit_soon_after_the_main_process_is_killed(
    api: LocalAPI, tmp_path: Path, nats_url: str, database_url: str, bus_prefix: str, db_schema: str
) -> None:
    config = write_config(tmp_path / "coleta.toml", config_text(api, bus_prefix, db_schema))
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with spawn(env, tmp_path / "daemon.log", "--workers", "2") as main:
        main.wait_event("workers.ready")
        pids = started_pids(main)
        assert len(pids) == 2
        main.proc.kill()
        main.proc.wait()
        wait_until(lambda: not any(alive(pid) for pid in pids), "no worker left", within_s=5)
    gone = events(main, "worker.main_process_gone")
    assert sorted(e["worker"] for e in gone) == [1, 2]
    assert sorted(e["worker"] for e in events(main, "daemon.stopped")) == [1, 2]


def test_a_killed_worker_is_restarted_and_its_run_is_not_lost(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    gate = threading.Event()
    api.route("/slow", json={"slow": True}, gate=gate)
    # A killed worker's command comes back after ack_wait_s.
    text = config_text(api, bus_prefix, db_schema, "ack_wait_s = 2")
    config = write_config(tmp_path / "coleta.toml", text)
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with spawn(env, tmp_path / "daemon.log", "--workers", "2") as main:
        main.wait_event("workers.ready")
        pid = started_pids(main)[0]
        trigger_all(env)
        # Both workers hold a run (one each at a time): worker 1 is killed mid-run.
        wait_until(lambda: len(api.hits("/slow")) >= 2, "a run held in each worker")
        os.kill(pid, signal.SIGKILL)
        gate.set()

        main.wait_event("worker.started", count=3)
        (exited,) = events(main, "worker.exited")
        assert exited["level"] == "error"
        assert (exited["worker"], exited["pid"], exited["signal"]) == (1, pid, "SIGKILL")
        assert exited["restart_in_s"] == 1.0
        new_pid = started_pids(main)[2]
        assert new_pid != pid
        assert alive(new_pid)

        wait_until(lambda: stored(db_conn) == len(SOURCES), "a row per run", within_s=40)
        runs = db_conn.execute("SELECT source, status FROM collection_runs ORDER BY 1").fetchall()
        assert runs == [(name, "stored") for name in SOURCES]
        assert main.stop() == 0
        assert not alive(new_pid)


def test_a_reload_reaches_the_workers(
    api: LocalAPI, tmp_path: Path, nats_url: str, database_url: str, bus_prefix: str, db_schema: str
) -> None:
    config = write_config(tmp_path / "coleta.toml", config_text(api, bus_prefix, db_schema))
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with spawn(env, tmp_path / "daemon.log", "--workers", "2") as main:
        main.wait_event("workers.ready")
        added = ["[[sources]]", 'name = "extra"', 'url = "http://127.0.0.1:9/x"']
        added.append('schedule = "0 0 1 1 *"')
        config.write_text(config.read_text() + "\n".join(added) + "\n")
        main.proc.send_signal(signal.SIGHUP)
        main.wait_event("config.reloaded", count=3)
        reloaded = {e.get("worker"): e for e in events(main, "config.reloaded")}
        assert sorted(reloaded, key=str) == [1, 2, None]
        assert all(e["added"] == ["extra"] for e in reloaded.values())
        # --workers holds over the file at a reload too: nothing waits for a restart.
        assert all(e["needs_restart"] == [] for e in reloaded.values())
        assert main.stop() == 0


def test_workers_use_the_embedded_nats_server_of_the_main_process(
    api: LocalAPI,
    tmp_path: Path,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    gate = threading.Event()
    api.route("/slow", json={"slow": True}, gate=gate)
    config = write_config(tmp_path / "coleta.toml", config_text(api, bus_prefix, db_schema))
    with server_state_dir("workers") as state:
        env = clean_env(
            DATABASE_URL=database_url,
            COLETA_CONFIG=str(config),
            COLETA_STATE_DIR=str(state),
            LOG_LEVEL="debug",  # fetch.done: which worker fetched each run
        )
        with spawn(env, tmp_path / "daemon.log", "--workers", "2") as main:
            main.wait_event("workers.ready", within_s=60)
            (embedded,) = events(main, "embedded.started")
            assert "worker" not in embedded  # started by the main process only
            trigger_all(env)
            hold_a_run_in_each_worker(api, gate)
            wait_until(lambda: stored(db_conn) == len(SOURCES), "a row per run")
            assert {e.get("worker") for e in events(main, "fetch.done")} == {1, 2}
            assert main.stop() == 0


def _free_run_of_ports(count: int) -> int:
    """A port P with P..P+count-1 all free now (the main process's and each worker's)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise AssertionError(f"no {count} free ports in a row")


def test_each_worker_serves_its_metrics_on_a_port_of_its_own(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    """With OTEL_METRICS_EXPORTER=prometheus every worker took the main process's port: each
    exited 2 (port in use) and was restarted for ever. Worker I serves on the port plus I."""
    api.route("/slow", json={"slow": True}, delay_s=0.5)
    config = write_config(tmp_path / "coleta.toml", config_text(api, bus_prefix, db_schema))
    port = _free_run_of_ports(3)
    env = clean_env(
        NATS_URL=nats_url,
        DATABASE_URL=database_url,
        COLETA_CONFIG=str(config),
        OTEL_METRICS_EXPORTER="prometheus",
        OTEL_EXPORTER_PROMETHEUS_HOST="127.0.0.1",
        OTEL_EXPORTER_PROMETHEUS_PORT=str(port),
    )
    with spawn(env, tmp_path / "daemon.log", "--workers", "2") as main:
        main.wait_event("workers.ready")
        trigger_all(env)
        wait_until(lambda: stored(db_conn) == len(SOURCES), "a row per run")
        health = coleta("health", "--json", env=env)
        assert json.loads(health.stdout)["checks"]["workers"] == {"ok": True, "detail": "2 running"}
        assert not events(main, "worker.exited")
        scraped = {
            p: httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=5).text
            for p in (port, port + 1, port + 2)
        }
        # The workers fetched and stored every run; the main process only queued them.
        runs = [
            float(line.rsplit(" ", 1)[1])
            for p in (port + 1, port + 2)
            for line in scraped[p].splitlines()
            if line.startswith("coleta_runs_total{") and 'coleta_outcome="stored"' in line
        ]
        assert sum(runs) == len(SOURCES), scraped
        assert "coleta_runs_total{" not in scraped[port]
        assert main.stop() == 0
