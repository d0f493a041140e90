"""SIGHUP: a valid config is applied without a restart; an invalid one is logged and ignored."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from tests._collect import source
from tests._proc import clean_env, coleta, spawn, wait_healthy, write_config
from tests.fix_http import LocalAPI


def as_toml(table: dict[str, Any]) -> str:
    """A ``[[sources]]`` table of the config file."""
    return "[[sources]]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in table.items()
    )


def names(env: dict[str, str]) -> list[str]:
    status = coleta("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    return [src["name"] for src in json.loads(status.stdout)["sources"]]


def scheduled_runs(env: dict[str, str], name: str) -> int:
    """What ``coleta runs`` shows: the source's runs started by its schedule."""
    runs = coleta("runs", name, "--limit", "1000", "--json", env=env)
    assert runs.returncode == 0, runs.stderr
    return sum(run["trigger"] == "schedule" for run in json.loads(runs.stdout)["runs"])


def runs_in_db(db: psycopg.Connection[Any], name: str) -> int:
    """The same count, read from PostgreSQL: cheap enough to wait on (a ``coleta`` process per
    look is most of a CPU second)."""
    query = "SELECT count(*) FROM collection_runs WHERE source = %s AND trigger = 'schedule'"
    row = db.execute(query, (name,)).fetchone()
    return int(row[0]) if row else 0


def wait_until(check: Callable[[], bool], within_s: float = 10) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not true after {within_s} s")


def test_sighup_applies_a_valid_config_and_keeps_the_old_on_an_invalid_one(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: psycopg.Connection[Any],
) -> None:
    api.route("/r", json={"ok": True})
    head = f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
    config = write_config(
        tmp_path / "coleta.toml",
        head
        + as_toml(source(api, "kept", "/r"))
        + as_toml(source(api, "removed", "/r", schedule="* * * * * *")),  # every second
    )
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with spawn(env, tmp_path / "daemon.log") as daemon:
        wait_healthy(env, daemon.proc, daemon.log)
        assert names(env) == ["kept", "removed"]
        wait_until(lambda: runs_in_db(db_conn, "removed") >= 1)
        assert scheduled_runs(env, "removed") >= 1

        # Valid: one source removed, one added (ticking every second), one kept.
        write_config(
            config,
            head
            + as_toml(source(api, "kept", "/r"))
            + as_toml(source(api, "added", "/r", schedule="* * * * * *")),
        )
        daemon.proc.send_signal(signal.SIGHUP)
        events = daemon.wait_event("config.reloaded")
        (line,) = [ln for ln in events.splitlines() if '"event":"config.reloaded"' in ln]
        reloaded = json.loads(line)
        assert (reloaded["added"], reloaded["removed"], reloaded["changed"]) == (
            ["added"],
            ["removed"],
            [],
        )
        assert names(env) == ["kept", "added"]
        # The ticker re-planned: the new source ticks, the removed one no more.
        wait_until(lambda: runs_in_db(db_conn, "added") >= 2)
        assert scheduled_runs(env, "added") >= 2
        assert coleta("trigger", "added", "--wait", "--wait-timeout", "15", env=env).returncode == 0
        gone = coleta("trigger", "removed", env=env)
        assert gone.returncode == 1
        assert gone.stderr.startswith("coleta: unknown source 'removed'")

        # Invalid: logged with the key, the running config kept.
        write_config(config, head + '[[sources]]\nname = "x"\nurl = "http://x"\nshedule = "1"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        events = daemon.wait_event("config.reload_failed")
        (line,) = [ln for ln in events.splitlines() if '"event":"config.reload_failed"' in ln]
        failed = json.loads(line)
        assert failed["level"] == "error"
        assert failed["error"] == f"{config}: sources[0].shedule: unknown key"
        assert names(env) == ["kept", "added"]
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0
