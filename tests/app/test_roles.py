"""Scale-out: stages split over processes still complete runs together."""

from __future__ import annotations

import json
from pathlib import Path

from tests._proc import clean_env, coleta, spawn, wait_healthy, write_config
from tests.fix_http import LocalAPI


def ready_roles(log: str) -> list[str]:
    (line,) = [ln for ln in log.splitlines() if '"event":"daemon.ready"' in ln]
    roles: list[str] = json.loads(line)["roles"]
    return roles


def test_a_fetcher_writer_process_and_a_ticker_service_process_complete_runs(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    api.route("/split", json={"split": True})
    config = write_config(
        tmp_path / "coleta.toml",
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
        'log_level = "DEBUG"\n'  # per-run lines (fetch.done, trigger.queued) are debug
        f'[[sources]]\nname = "split"\nurl = "{api.url("/split")}"\nschedule = "0 0 1 1 *"\n',
    )
    env = clean_env(NATS_URL=nats_url, DATABASE_URL=database_url, COLETA_CONFIG=str(config))
    with (
        spawn(env, tmp_path / "work.log", "--role", "fetcher,writer") as work,
        spawn(env, tmp_path / "front.log", "--role", "ticker,service") as front,
    ):
        assert ready_roles(work.wait_event("daemon.ready")) == ["writer", "fetcher"]
        wait_healthy(env, front.proc, front.log)
        assert ready_roles(front.events()) == ["service", "ticker"]

        result = coleta("trigger", "split", "--wait", "--wait-timeout", "15", "--json", env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        run = json.loads(result.stdout)
        assert run["status"] == "stored"
        assert len(api.hits("/split")) == 1
        # The work was done by the fetcher+writer process, not by the front one.
        assert '"event":"fetch.done"' in work.events()
        assert '"event":"fetch.' not in front.events()
        assert '"event":"trigger.queued"' in front.events()

        assert work.stop() == 0
        assert front.stop() == 0
