"""Configuration: TOML file + environment → ``Settings``, or a one-line ``ConfigError``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.errors import ConfigError
from daemon.schedule import Schedule
from daemon.settings import Retries, load_settings, parse_settings
from tests import ROOT
from tests._collect import source

EXAMPLE = ROOT / "examples" / "coleta.toml"
KNOWN = "(known: {scheduled_for}, {interval_start}, {interval_end}, {source}, {run_id})"

FULL_TOML = """\
nats_url = "nats://bus.example:4222"
database_url = "postgresql://coleta@db.example/coleta"
state_dir = "/var/lib/coleta"
log_level = "debug"
bus_prefix = "coleta_test"
database_schema = "collect"
max_concurrent_fetches = 4
shutdown_grace_s = 2.5
writer_batch_size = 64
stream_max_age_s = 86400
duplicate_window_s = 600

[[sources]]
name = "rates"
url = "https://api.example/v1/{scheduled_for:%Y-%m-%d}"
schedule = "0 17 * * 1-5"
timezone = "Europe/Berlin"
method = "POST"
headers = { Authorization = "Bearer abc", Accept = "application/json" }
params = { from = "EUR", since = "{interval_start:%Y-%m-%d}" }
timeout_s = 12.5
enabled = false
max_response_bytes = 1024

[sources.body]
day = "{scheduled_for:%d}"
tags = ["{source}", "fixed"]
nested = { run = "{run_id}", n = 3 }

[sources.retries]
max_attempts = 5
max_backoff_s = 60

[[sources]]
name = "ticks-2"
url = "http://localhost:8080/ticks"
schedule = "*/5 * * * * *"
method = "PUT"
body = "raw text {source}"
"""


def config_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc_info:
        parse_settings(data, "coleta.toml")
    return str(exc_info.value)


def write(tmp_path: Path, text: str, name: str = "coleta.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- a valid file


def test_valid_file_with_every_option(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL_TOML), env={})

    assert settings.nats_url == "nats://bus.example:4222"
    assert settings.database_url == "postgresql://coleta@db.example/coleta"
    assert settings.state_dir == "/var/lib/coleta"
    assert settings.log_level == "debug"
    assert settings.bus_prefix == "coleta_test"
    assert settings.database_schema == "collect"
    assert settings.max_concurrent_fetches == 4
    assert settings.shutdown_grace_s == 2.5
    assert settings.writer_batch_size == 64
    assert settings.stream_max_age_s == 86400
    assert settings.duplicate_window_s == 600

    rates, ticks = settings.sources
    assert rates.name == "rates"
    assert rates.url == "https://api.example/v1/{scheduled_for:%Y-%m-%d}"
    assert rates.schedule == "0 17 * * 1-5"
    assert rates.timezone == "Europe/Berlin"
    assert rates.method == "POST"
    assert rates.headers == {"Authorization": "Bearer abc", "Accept": "application/json"}
    assert rates.params == {"from": "EUR", "since": "{interval_start:%Y-%m-%d}"}
    assert rates.body == {
        "day": "{scheduled_for:%d}",
        "tags": ["{source}", "fixed"],
        "nested": {"run": "{run_id}", "n": 3},
    }
    assert rates.timeout_s == 12.5
    assert rates.enabled is False
    assert rates.retries == Retries(max_attempts=5, max_backoff_s=60)
    assert rates.max_response_bytes == 1024
    assert rates.cron == Schedule.parse("0 17 * * 1-5", "Europe/Berlin")

    assert ticks.name == "ticks-2"
    assert ticks.method == "PUT"
    assert ticks.body == "raw text {source}"
    assert settings.source("ticks-2") is ticks
    assert settings.source("nope") is None


def test_defaults_of_a_minimal_source() -> None:
    settings = parse_settings({"sources": [source()]})

    (rates,) = settings.sources
    assert rates.timezone == "UTC"
    assert rates.method == "GET"
    assert rates.headers == {}
    assert rates.params == {}
    assert rates.body is None
    assert rates.timeout_s == 30.0
    assert rates.enabled is True
    assert rates.retries == Retries(max_attempts=3, max_backoff_s=300.0)
    assert rates.max_response_bytes == 64 * 1024 * 1024
    assert settings.nats_url is None
    assert settings.database_url is None
    assert settings.state_dir == ".coleta"
    assert settings.log_level == "INFO"
    assert settings.bus_prefix == "coleta"


def test_example_config_loads() -> None:
    settings = load_settings(EXAMPLE, env={})

    assert [(s.name, s.schedule, s.timezone) for s in settings.sources] == [
        ("rates", "0 17 * * *", "Europe/Berlin"),
        ("lisbon_weather", "30 6 * * *", "Europe/Lisbon"),
    ]
    assert settings.nats_url is None
    assert settings.database_url is None


# -- errors name the key path and the bad value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(
            {"sources": [source(shedule="0 7 * * *")]},
            "coleta.toml: sources[0].shedule: unknown key",
            id="unknown-key-in-source",
        ),
        pytest.param(
            {"sources": [source(retries={"max_attemps": 2})]},
            "coleta.toml: sources[0].retries.max_attemps: unknown key",
            id="unknown-key-in-retries",
        ),
        pytest.param(
            {"sources": [source(), source(name="other", schedule="61 * * * *")]},
            "coleta.toml: sources[1].schedule: invalid cron expression '61 * * * *'",
            id="bad-cron",
        ),
        pytest.param(
            {"sources": [source(schedule="0 0 30 2 *")]},
            "coleta.toml: sources[0].schedule: cron expression '0 0 30 2 *' matches no date:"
            " it would never run",
            id="cron-no-date",
        ),
        pytest.param(
            {"sources": [source(schedule="0 7 *")]},
            "coleta.toml: sources[0].schedule: expected 5 cron fields"
            " (or 6 with seconds first), got '0 7 *'",
            id="cron-field-count",
        ),
        pytest.param(
            {"sources": [source(timezone="Mars/Olympus")]},
            "coleta.toml: sources[0].timezone: unknown timezone 'Mars/Olympus'"
            " (expected an IANA name like 'Europe/Lisbon')",
            id="unknown-timezone",
        ),
        pytest.param(
            {"sources": [source(), source(name="other"), source()]},
            "coleta.toml: sources[2].name: duplicate source name 'rates'"
            " (first defined at sources[0])",
            id="duplicate-name",
        ),
        pytest.param(
            {"sources": [source(name="Rates!")]},
            "coleta.toml: sources[0].name: 'Rates!' must match [a-z0-9_-]+",
            id="bad-name",
        ),
        pytest.param(
            {"sources": [source(url="ftp://api.example/rates")]},
            "coleta.toml: sources[0].url: 'ftp://api.example/rates'"
            " must start with http:// or https://",
            id="url-scheme",
        ),
        pytest.param(
            {"sources": [source(url="http://example.com:70000/")]},
            "coleta.toml: sources[0].url: 'http://example.com:70000/'"
            " is not a URL coleta can request: port 70000 is not in 1-65535",
            id="literal-port-out-of-range",
        ),
        pytest.param(
            {"sources": [source(url="http://{source}:99999/x")]},
            "coleta.toml: sources[0].url: 'http://{source}:99999/x' (as 'http://rates:99999/x')"
            " is not a URL coleta can request: port 99999 is not in 1-65535",
            id="templated-port-out-of-range",
        ),
        pytest.param(
            {"sources": [source(url="https://{scheduled_for:%d %b}.example/")]},
            "coleta.toml: sources[0].url: 'https://{scheduled_for:%d %b}.example/'"
            " (as 'https://01 Jan.example/') is not a URL coleta can request:"
            " the host '01%20jan.example' is not a valid host name or IP address",
            id="templated-space-in-host",
        ),
        pytest.param(
            {"sources": [source(url="http://{scheduled_for}/x")]},
            "coleta.toml: sources[0].url: 'http://{scheduled_for}/x'"
            " (as 'http://2026-01-01T00:00:00+00:00/x') is not a URL coleta can request:"
            " Invalid port: '00:00+00:00'",
            id="templated-date-as-host",
        ),
        pytest.param(
            {"sources": [source(url="https:///rates")]},
            "coleta.toml: sources[0].url: 'https:///rates' is not a URL coleta can request:"
            " there is no host",
            id="no-host",
        ),
        pytest.param(
            {"sources": [source(params={"day": "{source:%Y}"})]},
            "coleta.toml: sources[0].params.day: cannot render '{source:%Y}':"
            " Invalid format specifier '%Y' for object of type 'str'",
            id="params-format-spec",
        ),
        pytest.param(
            {"sources": [source(method="POST", body={"a": ["{run_id:>x}"]})]},
            "coleta.toml: sources[0].body: cannot render '{run_id:>x}':"
            " Unknown format code 'x' for object of type 'str'",
            id="body-format-spec",
        ),
        pytest.param(
            {"sources": [source(url="https://api.example/{day}")]},
            "coleta.toml: sources[0].url: unknown placeholder {day}"
            f" in 'https://api.example/{{day}}' {KNOWN}",
            id="placeholder-in-url",
        ),
        pytest.param(
            {"sources": [source(params={"date": "{when:%Y}"})]},
            f"coleta.toml: sources[0].params.date: unknown placeholder {{when}} in '{{when:%Y}}'"
            f" {KNOWN}",
            id="placeholder-in-params",
        ),
        pytest.param(
            {"sources": [source(method="POST", body={"a": {"b": ["ok", "{nope}"]}})]},
            f"coleta.toml: sources[0].body: unknown placeholder {{nope}} in '{{nope}}' {KNOWN}",
            id="placeholder-deep-in-body",
        ),
        pytest.param(
            {"sources": [source(body={"a": 1})]},
            "coleta.toml: sources[0].body: a body needs method POST, PUT or PATCH, not GET",
            id="body-with-get",
        ),
        pytest.param(
            {"sources": [source(method="DELETE", body="x")]},
            "coleta.toml: sources[0].body: a body needs method POST, PUT or PATCH, not DELETE",
            id="body-with-delete",
        ),
        pytest.param(
            {"sources": [source(method="FETCH")]},
            "coleta.toml: sources[0].method: Invalid enum value 'FETCH'",
            id="method",
        ),
        pytest.param(
            {"sources": [source(timeout_s=-1)]},
            "coleta.toml: sources[0].timeout_s: Expected `float` > 0.0 (got -1)",
            id="negative-timeout",
        ),
        pytest.param(
            {"sources": [source(retries={"max_attempts": 0})]},
            "coleta.toml: sources[0].retries.max_attempts: Expected `int` >= 1 (got 0)",
            id="zero-attempts",
        ),
        pytest.param(
            {"max_concurrent_fetches": -3},
            "coleta.toml: max_concurrent_fetches: Expected `int` >= 1 (got -3)",
            id="top-level-constraint",
        ),
        pytest.param(
            {"sources": [{"name": "rates", "schedule": "0 7 * * *"}]},
            "coleta.toml: sources[0]: Object missing required field `url`",
            id="missing-url",
        ),
        pytest.param(
            {"log_level": "LOUD"},
            "coleta.toml: log_level: 'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
            id="log-level",
        ),
        pytest.param(
            {"bus_prefix": "Coleta"},
            "coleta.toml: bus_prefix: 'Coleta' must match [a-z][a-z0-9_]*",
            id="bus-prefix",
        ),
        pytest.param(
            {"database_schema": "my-schema"},
            "coleta.toml: database_schema: 'my-schema' must match [a-z_][a-z0-9_]*",
            id="database-schema",
        ),
        pytest.param(
            {"duplicate_window_s": 7200, "stream_max_age_s": 3600},
            "coleta.toml: duplicate_window_s: 7200.0 must not exceed stream_max_age_s (3600.0)",
            id="window-beyond-retention",
        ),
    ],
)
def test_invalid_config_names_path_and_value(data: dict[str, Any], message: str) -> None:
    assert config_error(data) == message


@pytest.mark.parametrize(
    ("data", "prefix"),
    [
        pytest.param(
            {"sources": [source(timeout_s="30")]},
            "coleta.toml: sources[0].timeout_s: Expected `float`, got `str`",
            id="str-for-float",
        ),
        pytest.param(
            {"sources": [source(enabled="yes")]},
            "coleta.toml: sources[0].enabled: Expected `bool`, got `str`",
            id="str-for-bool",
        ),
        pytest.param(
            {"log_level": 5},
            "coleta.toml: log_level: Expected `str`, got `int`",
            id="int-for-str",
        ),
        pytest.param(
            {"sources": "rates"},
            "coleta.toml: sources: Expected `array`, got `str`",
            id="str-for-array",
        ),
    ],
)
def test_wrong_type_names_path_and_expected_type(data: dict[str, Any], prefix: str) -> None:
    assert config_error(data).startswith(prefix)


# -- reading the file


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as exc_info:
        load_settings(path, env={})

    assert str(exc_info.value) == f"{path}: no such file"


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "INFO"\n\n[[sources]]\nname = rates\n')

    with pytest.raises(ConfigError) as exc_info:
        load_settings(path, env={})

    message = str(exc_info.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "(at line 4, column 8)" in message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[[sources]]\nname = "rates"\nurl = "https://x.example"\nschedule = "x"\n'
    )

    with pytest.raises(ConfigError) as exc_info:
        load_settings(path, env={})

    assert str(exc_info.value) == (
        f"{path}: sources[0].schedule: expected 5 cron fields (or 6 with seconds first), got 'x'"
    )


# -- environment


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    env = {
        "NATS_URL": "nats://env-bus:4222",
        "DATABASE_URL": "postgresql://env-db/coleta",
        "LOG_LEVEL": "WARNING",
        "COLETA_STATE_DIR": "/tmp/env-state",
    }

    settings = load_settings(path, env=env)

    assert settings.nats_url == "nats://env-bus:4222"
    assert settings.database_url == "postgresql://env-db/coleta"
    assert settings.log_level == "WARNING"
    assert settings.state_dir == "/tmp/env-state"
    assert [s.name for s in settings.sources] == ["rates", "ticks-2"]


def test_workers_come_from_the_file_or_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    assert load_settings(path, env={}).worker_processes == 1  # the default: no workers
    assert load_settings(path, env={"COLETA_WORKERS": "4"}).worker_processes == 4
    auto = load_settings(path, env={"COLETA_WORKERS": "auto"})
    assert auto.workers == "auto"
    assert auto.worker_processes == len(os.sched_getaffinity(0))
    in_file = write(tmp_path, "workers = 3\n" + FULL_TOML)
    assert load_settings(in_file, env={}).worker_processes == 3
    with pytest.raises(ConfigError, match=r"workers: Expected `int` >= 1 \(got 0\)"):
        load_settings(path, env={"COLETA_WORKERS": "0"})


def test_empty_environment_variables_do_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)
    env = {"NATS_URL": "", "DATABASE_URL": "", "LOG_LEVEL": "", "COLETA_STATE_DIR": ""}

    settings = load_settings(path, env=env)

    assert settings.nats_url == "nats://bus.example:4222"
    assert settings.database_url == "postgresql://coleta@db.example/coleta"
    assert settings.log_level == "debug"
    assert settings.state_dir == "/var/lib/coleta"


def test_process_environment_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("DATABASE_URL", "LOG_LEVEL", "COLETA_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NATS_URL", "nats://from-os:4222")

    settings = load_settings(write(tmp_path, FULL_TOML))

    assert settings.nats_url == "nats://from-os:4222"


def test_coleta_config_is_used_without_a_path(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)

    settings = load_settings(None, env={"COLETA_CONFIG": str(path)})

    assert [s.name for s in settings.sources] == ["rates", "ticks-2"]


def test_explicit_path_wins_over_coleta_config(tmp_path: Path) -> None:
    chosen = write(tmp_path, FULL_TOML, "chosen.toml")
    other = write(tmp_path, "[[sources]]\n", "other.toml")

    settings = load_settings(chosen, env={"COLETA_CONFIG": str(other)})

    assert [s.name for s in settings.sources] == ["rates", "ticks-2"]


def test_config_file_wins_over_legacy_variables(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_TOML)

    settings = load_settings(
        None, env={"COLETA_CONFIG": str(path), "EXTERNAL_API_URL": "https://legacy.example"}
    )

    assert [s.name for s in settings.sources] == ["rates", "ticks-2"]


# -- legacy mode: one daily source from the environment


def test_legacy_source_from_environment() -> None:
    env = {
        "EXTERNAL_API_URL": "https://legacy.example/data",
        "EXTERNAL_API_KEY": "k3y",
        "SCHEDULE_HOUR": "7",
        "DATABASE_URL": "postgresql://db/coleta",
    }

    settings = load_settings(None, env=env)

    (only,) = settings.sources
    assert only.name == "external_api"
    assert only.url == "https://legacy.example/data"
    assert only.schedule == "0 7 * * *"
    assert only.timezone == "UTC"
    assert only.method == "GET"
    assert only.headers == {"Authorization": "Bearer k3y"}
    assert settings.database_url == "postgresql://db/coleta"


def test_legacy_source_without_key_or_hour() -> None:
    settings = load_settings(None, env={"EXTERNAL_API_URL": "https://legacy.example/data"})

    (only,) = settings.sources
    assert only.schedule == "0 0 * * *"
    assert only.headers == {}


@pytest.mark.parametrize("hour", ["25", "x", "-1", "7.5"])
def test_legacy_bad_schedule_hour(hour: str) -> None:
    env = {"EXTERNAL_API_URL": "https://legacy.example/data", "SCHEDULE_HOUR": hour}

    with pytest.raises(ConfigError) as exc_info:
        load_settings(None, env=env)

    assert str(exc_info.value) == f"SCHEDULE_HOUR: {hour!r} must be an hour from 0 to 23"


def test_legacy_url_is_validated() -> None:
    with pytest.raises(ConfigError) as exc_info:
        load_settings(None, env={"EXTERNAL_API_URL": "ftp://legacy.example"})

    assert str(exc_info.value) == (
        "environment: sources[0].url: 'ftp://legacy.example' must start with http:// or https://"
    )


def test_no_configuration_says_what_to_do() -> None:
    with pytest.raises(ConfigError) as exc_info:
        load_settings(None, env={"NATS_URL": "nats://bus:4222"})

    assert str(exc_info.value) == (
        "no configuration: pass --config FILE, set COLETA_CONFIG, "
        "or set EXTERNAL_API_URL (with SCHEDULE_HOUR) for a single daily source"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sourcs": []}, "coleta.toml: sourcs: unknown key"),
        (
            {"sources": [source(timeout_s="30")]},
            "coleta.toml: sources[0].timeout_s: Expected `float`, got `str` (got '30')",
        ),
        (
            {"sources": [source(timeout_s=0)]},
            "coleta.toml: sources[0].timeout_s: Expected `float` > 0.0 (got 0)",
        ),
        ({"shutdown_grace_s": 0}, "coleta.toml: shutdown_grace_s: Expected `float` > 0.0 (got 0)"),
        (
            {"sources": [source(catchup_window="7 days")]},
            "coleta.toml: sources[0].catchup_window: '7 days' is not a duration like '90s',"
            " '30m', '12h' or '7d'",
        ),
    ],
)
def test_errors_show_the_bad_value(data: dict[str, Any], message: str) -> None:
    assert config_error(data) == message


# -- where a page's records are


OFFSET_NEEDS = (
    "coleta.toml: sources[0].pagination.records_path: offset pagination needs to know where a"
    " page's records are (a page shorter than limit is the last), or has_more_path /"
    ' total_path to stop on; use records_path = "$" when the body itself is the list'
)


def test_offset_pagination_without_records_or_a_stop_is_refused_naming_the_key() -> None:
    assert config_error({"sources": [source(pagination={"kind": "offset"})]}) == OFFSET_NEEDS


def test_check_config_refuses_offset_pagination_without_records_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[[sources]]\nname = "a"\nurl = "http://x/a"\nschedule = "0 6 * * *"\n'
        'pagination = { kind = "offset", limit = 50 }\n',
    )
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"coleta: {OFFSET_NEEDS.replace('coleta.toml', str(path))}\n"


@pytest.mark.parametrize(
    "where",
    [
        pytest.param({"records_path": "$"}, id="source-top"),
        pytest.param({"records_path": "data.rows"}, id="source-path"),
        pytest.param({"pagination": {"kind": "offset", "records_path": "$"}}, id="pagination-top"),
        pytest.param({"pagination": {"kind": "offset", "records_path": "a[0]"}}, id="pagination"),
        pytest.param({"pagination": {"kind": "offset", "has_more_path": "more"}}, id="has-more"),
        pytest.param({"pagination": {"kind": "offset", "total_path": "n"}}, id="total"),
    ],
)
def test_offset_pagination_with_records_or_a_stop_is_accepted(where: dict[str, Any]) -> None:
    data = source(pagination={"kind": "offset"}) | where
    (parsed,) = parse_settings({"sources": [data]}).sources
    assert parsed.pagination is not None
    assert parsed.pagination.kind == "offset"


def test_records_path_dollar_is_the_body_itself_anywhere_a_records_path_is_taken() -> None:
    (parsed,) = parse_settings(
        {"sources": [source(records_path="$", granularity="record", pagination={"kind": "page"})]}
    ).sources
    assert parsed.records_path == "$"
    for bad in ("$.data", "$[0]", "a..b"):
        assert config_error({"sources": [source(records_path=bad)]}) == (
            f"coleta.toml: sources[0].records_path: {bad!r} is not a path like 'data.items' or"
            " 'a[0].b' ('$' alone is the body itself)"
        )
    assert config_error(
        {"sources": [source(pagination={"kind": "page", "records_path": "$.x"})]}
    ).startswith("coleta.toml: sources[0].pagination.records_path: '$.x' is not a path")
    # Keys that merely hold a $ are keys.
    parse_settings({"sources": [source(records_path="data.$values")]})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://example.com:70000/",
            "sources[0].url: 'http://example.com:70000/' is not a URL coleta can request:"
            " port 70000 is not in 1-65535",
        ),
        (
            "http://{source}:99999/x",
            "sources[0].url: 'http://{source}:99999/x' (as 'http://a:99999/x') is not a URL"
            " coleta can request: port 99999 is not in 1-65535",
        ),
    ],
)
def test_check_config_refuses_a_url_coleta_cannot_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, message: str
) -> None:
    path = write(tmp_path, f'[[sources]]\nname = "a"\nurl = "{url}"\nschedule = "0 6 * * *"\n')
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"coleta: {path}: {message}\n"


def test_check_config_refuses_a_token_url_coleta_cannot_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLETA_SECRET_K", "v4lue")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = write(
        tmp_path,
        '[[sources]]\nname = "a"\nurl = "https://api.example/"\nschedule = "0 6 * * *"\n'
        '[sources.auth]\nkind = "oauth2"\ntoken_url = "https://auth.example:0/token"\n'
        'client_id = "c"\nclient_secret = { secret = "k" }\n',
    )
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"coleta: {path}: sources[0].auth.token_url: 'https://auth.example:0/token'"
        " is not a URL coleta can request: port 0 is not in 1-65535\n"
    )
