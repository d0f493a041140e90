"""The command line as a user runs it: real processes, exit codes, one-line errors, signals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import nats
import psycopg
import pytest

from contracts import Subjects, TriggerReply, encode
from daemon.app import open_daemon
from daemon.platform.embedded import read_state_urls
from daemon.platform.migrate import migrations
from tests._collect import SOURCES, insert_failed_runs, many_sources
from tests._proc import COLETA, alive, clean_env, coleta, spawn, wait_healthy, write_config
from tests.fix_daemon import MakeSettings
from tests.fix_http import LocalAPI


def test_version_and_help() -> None:
    version = coleta("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("coleta ")
    for command in ("run", "migrate", "check-config", "status", "trigger", "runs", "health"):
        result = coleta(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: coleta" in result.stdout


def test_check_config_accepts_the_example() -> None:
    result = coleta("check-config", "examples/coleta.toml")
    assert result.returncode == 0, result.stderr
    assert "ok (2 sources: rates, lisbon_weather)" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "61 * * * *"\n',
            "sources[0].schedule: invalid cron expression '61 * * * *'",
        ),
        (
            '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "0 6 * * *"\n'
            'timezone = "Mars/Olympus"\n',
            "sources[0].timezone: unknown timezone 'Mars/Olympus'",
        ),
        (
            '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "0 6 * * *"\nshedule = "x"\n',
            "sources[0].shedule: unknown key",
        ),
        (
            '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "0 6 * * *"\n'
            '[[sources]]\nname = "a"\nurl = "http://y"\nschedule = "0 7 * * *"\n',
            "sources[1].name: duplicate source name 'a' (first defined at sources[0])",
        ),
        ("sources = [", "not valid TOML"),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_bad_config_is_one_clear_line_and_exit_2(
    tmp_path: Path, text: str, expected: str, command: str
) -> None:
    path = write_config(tmp_path / "bad.toml", text)
    args = (
        ("check-config", str(path)) if command == "check-config" else ("run", "--config", str(path))
    )
    result = coleta(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"coleta: {path}: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("workers", ["0", "65", "many"])
def test_a_bad_workers_count_is_one_clear_line_and_exit_2(tmp_path: Path, workers: str) -> None:
    path = write_config(tmp_path / "ok.toml", 'bus_prefix = "x"\n')
    result = coleta("run", "--config", str(path), "--workers", workers)
    assert (result.returncode, result.stderr) == (
        2,
        f"coleta: --workers: {workers!r} is not a count from 1 to 64 or 'auto'\n",
    )


def test_client_commands_say_clearly_when_no_daemon_answers(tmp_path: Path) -> None:
    result = coleta("status", "--server", "nats://127.0.0.1:9")
    assert result.returncode == 3
    assert result.stderr.startswith("coleta: cannot reach NATS at nats://127.0.0.1:9")
    assert "Traceback" not in result.stderr


@pytest.fixture
def daemon_process(
    api: LocalAPI, tmp_path: Path, nats_url: str, database_url: str, bus_prefix: str, db_schema: str
) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Path]]:
    """``coleta run`` as a child process on the test's servers."""
    api.route("/cli", json={"from": "cli"})
    api.route("/broken", status=404, json={"error": "no such thing"})
    config = write_config(
        tmp_path / "coleta.toml",
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[[sources]]\nname = "cli"\nurl = "{api.url("/cli")}"\nschedule = "0 0 1 1 *"\n'
        f'[[sources]]\nname = "broken"\nurl = "{api.url("/broken")}"\nschedule = "0 0 1 1 *"\n',
    )
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with spawn(env, tmp_path / "daemon.log") as daemon:
        wait_healthy(env, daemon.proc, daemon.log)
        yield daemon.proc, env, daemon.log


def count_rows(database_url: str, schema: str) -> int:
    with psycopg.connect(database_url, options=f"-c search_path={schema}") as conn:
        row = conn.execute("SELECT count(*) FROM collected_data").fetchone()
        assert row is not None
        return int(row[0])


def wait_rows(database_url: str, schema: str, n: int, within_s: float = 20) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if count_rows(database_url, schema) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} rows after {within_s} s")


def test_run_trigger_status_and_sigterm(
    daemon_process: tuple[subprocess.Popen[str], dict[str, str], Path],
    database_url: str,
    db_schema: str,
) -> None:
    proc, env, log = daemon_process
    trigger = coleta("trigger", "cli", env=env)
    assert trigger.returncode == 0, trigger.stderr
    assert trigger.stdout.startswith("queued cli@")
    wait_rows(database_url, db_schema, 1)

    status = coleta("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "bus ok  database ok" in status.stdout
    (line,) = [ln for ln in status.stdout.splitlines() if ln.startswith("cli ")]
    # LAST, AGE (seconds since that run was stored), ROWS, FAILS, DLQ, then the 30-day strip
    # ending today with a stored run.
    assert re.search(r" stored +\d+s +1 +0 +0 +\| *█\|$", line), line

    runs = coleta("runs", "cli", "--json", env=env)
    assert runs.returncode == 0
    assert '"status": "stored"' in runs.stdout

    unknown = coleta("trigger", "nope", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr == "coleta: unknown source 'nope' (configured: cli, broken)\n"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    events = log.read_text()
    assert '"event":"daemon.signal"' in events
    assert '"event":"daemon.stopped"' in events


def test_legacy_environment_defines_one_daily_source(
    api: LocalAPI, tmp_path: Path, nats_url: str, database_url: str, db_schema: str, bus_prefix: str
) -> None:
    """No config file: EXTERNAL_API_URL, EXTERNAL_API_KEY and SCHEDULE_HOUR, as originally."""
    api.route("/legacy", json={"legacy": True})
    env = clean_env(
        NATS_URL=nats_url,
        DATABASE_URL=database_url,
        EXTERNAL_API_URL=api.url("/legacy"),
        EXTERNAL_API_KEY="s3cr3t-key",
        SCHEDULE_HOUR="7",
        COLETA_STATE_DIR=str(tmp_path / "state"),
        COLETA_BUS_PREFIX=bus_prefix,
        COLETA_DATABASE_SCHEMA=db_schema,
    )
    with spawn(env, tmp_path / "legacy.log") as daemon:
        wait_healthy(env, daemon.proc, daemon.log)
        status = coleta("status", "--json", env=env)
        assert '"name": "external_api"' in status.stdout
        assert '"schedule": "0 7 * * *"' in status.stdout
        assert coleta("trigger", "external_api", env=env).returncode == 0
        deadline = time.monotonic() + 20
        while not api.hits("/legacy") and time.monotonic() < deadline:
            time.sleep(0.1)
        (hit,) = api.hits("/legacy")
        assert hit.headers["authorization"] == "Bearer s3cr3t-key"
        assert daemon.stop() == 0
    assert "s3cr3t-key" not in (tmp_path / "legacy.log").read_text()


def test_embedded_default_runs_the_real_thing_and_stops_it(api: LocalAPI) -> None:
    """No NATS_URL / DATABASE_URL: `coleta run` starts nats-server and PostgreSQL itself."""
    api.route("/embedded", body="a,b\n1,2\n", content_type="text/csv")
    state = Path(tempfile.mkdtemp(prefix="coleta-cli-state-"))
    try:
        config = write_config(
            state / "coleta.toml",
            f'state_dir = "{state / "state"}"\n'
            f'[[sources]]\nname = "emb"\nurl = "{api.url("/embedded")}"\nschedule = "0 0 1 1 *"\n',
        )
        env = clean_env(COLETA_CONFIG=str(config))
        log_path = state / "daemon.log"
        with spawn(env, log_path) as daemon:
            wait_healthy(env, daemon.proc, log_path)
            urls = read_state_urls(state / "state")
            assert urls.nats_url is not None
            assert urls.database_url is not None
            assert not urls.nats_url.endswith(":4222")
            assert coleta("trigger", "emb", env=env).returncode == 0
            deadline = time.monotonic() + 20
            stored: list[Any] = []
            while not stored and time.monotonic() < deadline:
                with psycopg.connect(urls.database_url) as conn:
                    stored = conn.execute(
                        "SELECT body, content_type FROM collected_data"
                    ).fetchall()
                time.sleep(0.1)
            assert stored == [(b"a,b\n1,2\n", "text/csv")]
            nats_pid = int((state / "state" / "nats" / "nats-server.pid").read_text())
            assert daemon.stop(timeout_s=30) == 0
        after = read_state_urls(state / "state")
        assert after.nats_url is None
        assert after.database_url is None
        assert not alive(nats_pid)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_migrate_applies_the_schema_once(database_url: str, db_schema: str, tmp_path: Path) -> None:
    """Only DATABASE_URL: no config file, no NATS, nothing written to the working directory."""
    env = clean_env(DATABASE_URL=database_url, COLETA_DATABASE_SCHEMA=db_schema)
    first = coleta("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"migrations applied to schema {db_schema}" in first.stdout
    assert '"event":"db.migrated"' in first.stdout
    second = coleta("migrate", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert '"event":"db.migrated"' not in second.stdout
    assert list(tmp_path.iterdir()) == []
    with psycopg.connect(database_url) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
            " ORDER BY table_name",
            (db_schema,),
        ).fetchall()
        versions = conn.execute(
            f'SELECT version, name FROM "{db_schema}".schema_migrations'
        ).fetchall()
    assert tables == [
        ("collected_data",),
        ("collection_runs",),
        ("schema_migrations",),
        ("source_state",),
    ]
    # Every bundled migration, each once.
    assert versions == [(version, name) for version, name, _ in migrations()]
    assert versions[:5] == [
        (1, "0001_init.sql"),
        (2, "0002_missed_and_replayed_runs.sql"),
        (3, "0003_pages_records_source_state.sql"),
        (4, "0004_lz4_compression.sql"),
        (5, "0005_content_addressed_rows.sql"),
    ]


def migrated(database_url: str, schema: str) -> list[int]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f'SELECT version FROM "{schema}".schema_migrations ORDER BY version'
        ).fetchall()
    return [row[0] for row in rows]


def test_migrate_never_starts_nats(database_url: str, db_schema: str, tmp_path: Path) -> None:
    """NATS down (or never there), no embedded nats-server: migrate needs only the database."""
    state = tmp_path / "state"
    closed = "nats://127.0.0.1:9"
    without_nats = coleta(
        "migrate",
        env=clean_env(
            DATABASE_URL=database_url,
            COLETA_DATABASE_SCHEMA=db_schema,
            COLETA_STATE_DIR=str(state),
        ),
        cwd=tmp_path,
    )
    assert without_nats.returncode == 0, without_nats.stderr
    assert not (state / "nats.url").exists()
    assert not (state / "nats").exists()
    assert migrated(database_url, db_schema) == [version for version, _, _ in migrations()]

    # A config's database_schema, a NATS_URL nobody listens on, secrets it cannot resolve.
    config = write_config(
        tmp_path / "coleta.toml",
        f'nats_url = "{closed}"\ndatabase_schema = "{db_schema}_cfg"\n'
        f'state_dir = "{state}"\n'
        '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "0 6 * * *"\n'
        'headers = { Authorization = { secret = "not-here" } }\n',
    )
    with_config = coleta(
        "migrate",
        "--config",
        str(config),
        env=clean_env(DATABASE_URL=database_url, NATS_URL=closed),
        cwd=tmp_path,
    )
    try:
        assert with_config.returncode == 0, with_config.stderr
        assert f"migrations applied to schema {db_schema}_cfg" in with_config.stdout
        assert migrated(database_url, f"{db_schema}_cfg") == [
            version for version, _, _ in migrations()
        ]
        assert not (state / "nats.url").exists()
        assert not (state / "nats").exists()
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{db_schema}_cfg" CASCADE')

    bad = coleta(
        "migrate",
        env=clean_env(DATABASE_URL=database_url, COLETA_DATABASE_SCHEMA="Bad-Schema"),
        cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr == (
        "coleta: environment: database_schema: 'Bad-Schema' must match [a-z_][a-z0-9_]*\n"
    )


def test_status_strip_shows_each_days_best_outcome(
    daemon_process: tuple[subprocess.Popen[str], dict[str, str], Path],
    database_url: str,
    db_schema: str,
) -> None:
    """One mark per UTC day: stored beats unchanged beats failed beats missed; gaps are blank."""
    _, env, _ = daemon_process
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    history = [
        (1, "stored", 3),
        (2, "failed", 0),
        (3, "missed", 0),
        (4, "stored", 0),  # stored, nothing new: unchanged
        (5, "failed", 0),
        (5, "stored", 2),  # a failure then a success the same day: stored
        (6, "missed", 0),
        (6, "failed", 0),  # a failed run beats a missed slot
        (29, "stored", 1),  # the oldest day of the strip
        (30, "stored", 1),  # one day too old: not shown
    ]
    with psycopg.connect(database_url, options=f"-c search_path={db_schema}") as conn:
        for i, (back, outcome, rows) in enumerate(history):
            slot = today - timedelta(days=back)
            conn.execute(
                "INSERT INTO collection_runs (run_id, source, trigger, scheduled_for, status, rows,"
                " created_at) VALUES (%s, 'cli', 'schedule', %s, %s, %s, %s)",
                (f"cli@old-{i}", slot, outcome, rows, slot),
            )
    expected = "█" + " " * 22 + "x█=·x█" + " "  # 29 days ago … yesterday, then today (empty)

    status = coleta("status", "cli", env=env)
    assert status.returncode == 0, status.stderr
    (line,) = [ln for ln in status.stdout.splitlines() if ln.startswith("cli ")]
    assert line.endswith(f"|{expected}|"), line
    assert not [ln for ln in status.stdout.splitlines() if ln.startswith("broken ")]
    assert "█ stored  = unchanged  ~ running  x failed  · missed" in status.stdout

    as_json = coleta("status", "cli", "--json", env=env)
    assert as_json.returncode == 0
    (source,) = json.loads(as_json.stdout)["sources"]
    days = {d["day"]: d["outcome"] for d in source["days"]}
    assert len(days) == 7
    assert days[(today - timedelta(days=4)).date().isoformat()] == "unchanged"
    assert days[(today - timedelta(days=6)).date().isoformat()] == "failed"

    unknown = coleta("status", "nope", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr == "coleta: unknown source 'nope' (configured: cli, broken)\n"


def test_trigger_wait_follows_the_run_and_exits_by_its_outcome(
    daemon_process: tuple[subprocess.Popen[str], dict[str, str], Path],
) -> None:
    _, env, _ = daemon_process
    ok = coleta("trigger", "cli", "--wait", "--wait-timeout", "20", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.splitlines()
    assert lines[0].startswith("queued cli@")
    assert re.match(r"stored: 1 rows, 1 pages in \d+\.\d s, trace [0-9a-f]{32}$", lines[-1])

    failed = coleta("trigger", "broken", "--wait", "--wait-timeout", "20", env=env)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert failed.stdout.splitlines()[-1].startswith("failed after 1 attempts (HTTP 404): ")

    as_json = coleta("trigger", "cli", "--wait", "--json", env=env)
    assert as_json.returncode == 0
    run = json.loads(as_json.stdout)
    assert (run["source"], run["status"], run["trigger"]) == ("cli", "stored", "manual")

    runs = coleta("runs", "--limit", "2", env=env)
    assert runs.returncode == 0
    header, *rows = runs.stdout.splitlines()
    assert header.split() == [
        "RUN",
        "TRIGGER",
        "SCHEDULED",
        "STATUS",
        "ROWS",
        "HTTP",
        "TOOK",
        "TRACE",
        "ERROR",
    ]
    assert len(rows) == 2
    assert rows[0].startswith(run["run_id"])
    assert run["trace_id"] in rows[0]
    assert rows[1].startswith("broken@")
    assert re.search(r" failed +0 +404 ", rows[1]), rows[1]

    unknown = coleta("trigger", "nope", "--wait", env=env)
    assert unknown.returncode == 1
    assert "Traceback" not in unknown.stderr
    assert unknown.stderr.count("\n") == 1


def test_health_and_runs_errors_are_one_line(
    daemon_process: tuple[subprocess.Popen[str], dict[str, str], Path], nats_url: str
) -> None:
    _, env, _ = daemon_process
    health = coleta("health", "--json", env=env)
    assert health.returncode == 0
    assert json.loads(health.stdout)["status"] == "ok"
    assert coleta("health", env=env).stdout == "ok\n"

    runs = coleta("runs", "nope", env=env)
    assert (runs.returncode, runs.stderr) == (1, "coleta: unknown source 'nope'\n")

    elsewhere = coleta("health", "--server", nats_url, env=clean_env(COLETA_BUS_PREFIX="nobody"))
    assert elsewhere.returncode == 3
    # A password in the URL (the embedded server's) is never shown.
    where = urlsplit(nats_url)
    assert elsewhere.stderr.startswith("coleta: no coleta daemon answers on nobody.health at ")
    assert elsewhere.stderr.endswith(f"{where.hostname}:{where.port}\n")
    if where.password:
        assert where.password not in elsewhere.stderr

    bad_role = coleta("run", "--role", "ticker,cook", env=env)
    assert bad_role.returncode == 2
    assert bad_role.stderr.startswith("coleta: --role: unknown role 'cook'")


@pytest.mark.anyio
async def test_status_and_runs_follow_every_page(
    make_settings: MakeSettings,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
    bus_prefix: str,
) -> None:
    """2,000 sources whose last runs failed with long errors: more than one NATS message."""
    env = clean_env(NATS_URL=nats_url, COLETA_BUS_PREFIX=bus_prefix)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return coleta(*args, env=env, timeout=60)

    async with open_daemon(make_settings(many_sources()), roles=("service",)):
        insert_failed_runs(db_conn)
        status = await anyio.to_thread.run_sync(cli, "status")
        status_json = await anyio.to_thread.run_sync(cli, "status", "--json")
        runs = await anyio.to_thread.run_sync(cli, "runs", "--limit", "1000")
        runs_json = await anyio.to_thread.run_sync(cli, "runs", "--limit", "1000", "--json")
        one = await anyio.to_thread.run_sync(cli, "status", "src1999")

    assert status.returncode == 0, status.stderr
    listed = [line.split()[0] for line in status.stdout.splitlines() if line.startswith("src")]
    assert listed == [f"src{i:04d}" for i in range(SOURCES)]
    assert status_json.returncode == 0, status_json.stderr
    reply = json.loads(status_json.stdout)
    assert [src["name"] for src in reply["sources"]] == listed
    assert reply["next"] is None
    assert runs.returncode == 0, runs.stderr
    rows = runs.stdout.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [
        f"src{i:04d}@20261201T000000Z-manual-{i}" for i in range(1000)
    ]
    assert runs_json.returncode == 0, runs_json.stderr
    assert len(json.loads(runs_json.stdout)["runs"]) == 1000
    assert one.returncode == 0, one.stderr
    assert [ln.split()[0] for ln in one.stdout.splitlines() if ln.startswith("src")] == ["src1999"]


@pytest.mark.anyio
async def test_trigger_waits_out_a_failover_before_saying_no_reply(
    nats_url: str, bus_prefix: str
) -> None:
    """A trigger during a cluster failover is answered once JetStream has a leader again, 5 to
    10 s later: giving up at the usual 5 s told the user "no reply" for a run that was queued,
    and a second trigger queued it twice. A service that answers after 7 s is waited for."""
    answered = datetime(2026, 1, 1, tzinfo=UTC)
    reply = TriggerReply(
        run_id="slow@20260101T000000Z-manual-abcdef", source="slow", scheduled_for=answered
    )
    nc = await nats.connect(nats_url)
    try:

        async def late(msg: Any) -> None:
            await anyio.sleep(7)
            await msg.respond(encode(reply))

        await nc.subscribe(Subjects(bus_prefix).endpoint("trigger"), cb=late)
        await nc.flush()
        env = clean_env(NATS_URL=nats_url, COLETA_BUS_PREFIX=bus_prefix)
        started = time.monotonic()
        result = await anyio.to_thread.run_sync(
            lambda: coleta("trigger", "slow", env=env, timeout=60)
        )
    finally:
        await nc.close()
    assert result.returncode == 0, result.stderr
    assert "slow@20260101T000000Z-manual-abcdef" in result.stdout
    assert time.monotonic() - started >= 7


def test_a_reader_that_goes_away_is_no_traceback() -> None:
    """`coleta … | head` closes the pipe before coleta has written: exit 141 as a shell
    reports SIGPIPE, nothing on stderr (it printed a BrokenPipeError traceback)."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte
    try:
        result = subprocess.run(
            [*COLETA, "check-config", "examples/coleta.toml"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_output_stopped_and_resumed_arrives_whole(tmp_path: Path, unbuffered: str) -> None:
    """`coleta … | jq`, suspended and resumed (Ctrl-Z and fg, a profiler attaching) while the
    pipe is full: every byte arrives. Under PYTHONUNBUFFERED=1, which the Containerfile sets,
    Python dropped the rest of a write that a signal cut short, and said nothing (exit 0)."""
    names = [f"source_{i:04d}_{'x' * 60}" for i in range(6000)]
    config = tmp_path / "many.toml"
    config.write_text(
        "".join(
            f'[[sources]]\nname = "{name}"\nurl = "http://127.0.0.1:9/x"\nschedule = "0 6 * * *"\n'
            for name in names
        )
    )
    expected = f"{config}: ok ({len(names)} sources: {', '.join(names)})\n".encode()
    assert len(expected) > 4 * 65536  # several times what a pipe holds
    with subprocess.Popen(
        [*COLETA, "check-config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(PYTHONUNBUFFERED=unbuffered),
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        received = bytearray()
        # Read slowly, stopping and resuming the writer until it is done.
        while chunk := os.read(proc.stdout.fileno(), 4096):
            received += chunk
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGSTOP)
                time.sleep(0.001)
                proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr.read() == b""
    assert len(received) == len(expected)
    assert bytes(received) == expected
