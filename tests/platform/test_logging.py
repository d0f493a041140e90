"""JSON log lines: shape, levels, trace correlation, and no secrets."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from daemon.platform import logs, tracing
from daemon.platform.logs import get_logger, setup_logging
from daemon.platform.spans import producer_span

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    """Leave the root logger and the tracing provider as they were."""
    tracing.use_provider(TracerProvider())
    yield
    logs._reset_for_tests()
    tracing._reset_for_tests()


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every output line, each of which must be exactly one JSON object."""
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


def test_line_shape_and_extra_fields(out: io.StringIO) -> None:
    setup_logging("INFO", out)
    started = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
    get_logger("daemon.writer").info(
        "run.stored",
        extra={"source": "rates", "run_id": "r1", "rows": 3, "started": started, "odd": object()},
    )
    (line,) = lines(out)
    assert TS.match(line["ts"])
    assert abs(dt.datetime.fromisoformat(line["ts"]) - dt.datetime.now(dt.UTC)).total_seconds() < 5
    assert line["level"] == "info"
    assert line["event"] == "run.stored"
    assert line["logger"] == "coleta.writer"
    assert (line["source"], line["run_id"], line["rows"]) == ("rates", "r1", 3)
    assert line["started"] == "2024-05-01T12:00:00Z"
    assert line["odd"].startswith("<object object")
    assert "trace_id" not in line
    assert "span_id" not in line


def test_extra_fields_cannot_overwrite_core_fields(out: io.StringIO) -> None:
    setup_logging("INFO", out)
    get_logger("t").warning("ev", extra={"level": "fake", "event": "fake"})
    (line,) = lines(out)
    assert (line["level"], line["event"]) == ("warning", "ev")
    assert (line["extra.level"], line["extra.event"]) == ("fake", "fake")


def test_line_inside_a_span_carries_its_ids(out: io.StringIO) -> None:
    setup_logging("INFO", out)
    log = get_logger("fetcher")
    with producer_span("coleta.cmd.rates", source="rates", run_id="r1") as span:
        log.info("fetch.start")
    log.info("fetch.after")
    inside, after = lines(out)
    context = span.get_span_context()
    assert inside["trace_id"] == f"{context.trace_id:032x}"
    assert inside["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in after


def test_levels_filter_ours_and_the_libraries(out: io.StringIO) -> None:
    setup_logging("warning", out)
    log = get_logger("ticker")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("some.library").info("lib.info")
    logging.getLogger("some.library").warning("lib.warning")
    assert [(line["level"], line["event"]) for line in lines(out)] == [
        ("warning", "w"),
        ("error", "e"),
        ("warning", "lib.warning"),
    ]


def test_level_holds_for_a_library_that_sets_its_own(out: io.StringIO) -> None:
    chatty = logging.getLogger("chatty.library")
    chatty.setLevel(logging.DEBUG)
    try:
        setup_logging("INFO", out)
        chatty.debug("lib.debug")
        chatty.info("lib.info")
    finally:
        chatty.setLevel(logging.NOTSET)
    assert [line["event"] for line in lines(out)] == ["lib.info"]


def test_noisy_libraries_stay_at_warning(out: io.StringIO) -> None:
    setup_logging("debug", out)
    get_logger("ticker").debug("ours")
    logging.getLogger("httpx").info("HTTP Request: GET https://x")
    logging.getLogger("nats.aio.client").debug("frame")
    logging.getLogger("httpx").warning("slow")
    assert [line["event"] for line in lines(out)] == ["ours", "slow"]

    again = io.StringIO()
    setup_logging(logging.ERROR, again)
    logging.getLogger("httpx").warning("slow")
    get_logger("ticker").error("bad")
    assert [line["event"] for line in lines(again)] == ["bad"]


def test_setup_twice_replaces_the_handler(out: io.StringIO) -> None:
    setup_logging("INFO", out)
    second = io.StringIO()
    setup_logging("INFO", second)
    get_logger("x").info("once")
    assert out.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]


def test_secrets_in_extra_fields_are_redacted(out: io.StringIO) -> None:
    setup_logging("INFO", out)
    get_logger("fetcher").info(
        "fetch.done",
        extra={
            "url": "https://bob:s3cr3t@api.example/v1?api_key=s3cr3t&base=EUR",
            "headers": {"Authorization": "Bearer s3cr3t", "Accept": "application/json"},
            "token": "s3cr3t",
            "db_password": "s3cr3t",
            "retries": ["https://api.example/v1?access_token=s3cr3t"],
        },
    )
    assert "s3cr3t" not in out.getvalue()
    (line,) = lines(out)
    assert line["url"] == "https://api.example/v1?api_key=REDACTED&base=EUR"
    assert line["headers"] == {"Authorization": "REDACTED", "Accept": "application/json"}
    assert line["token"] == "REDACTED"
    assert line["db_password"] == "REDACTED"
    assert line["retries"] == ["https://api.example/v1?access_token=REDACTED"]


def test_exception_info_is_included_and_redacted(out: io.StringIO) -> None:
    setup_logging("INFO", out)

    def fetch() -> None:
        raise ConnectionError("GET https://api.example/v1?apikey=s3cr3t failed")

    try:
        fetch()
    except ConnectionError:
        get_logger("fetcher").exception("fetch.failed", extra={"source": "rates"})
    (line,) = lines(out)
    assert line["level"] == "error"
    assert line["source"] == "rates"
    assert line["exc_type"] == "ConnectionError"
    assert line["error"] == "GET https://api.example/v1?apikey=REDACTED failed"
    assert "in fetch" in line["traceback"]
    assert line["traceback"].rstrip().endswith(f"ConnectionError: {line['error']}")
    assert "s3cr3t" not in out.getvalue()


@pytest.mark.parametrize("level", ["LOUD", "", 15, "20"])
def test_bad_level_names_the_value(level: str | int) -> None:
    with pytest.raises(ValueError, match="debug, info, warning, error, critical") as caught:
        setup_logging(level)
    assert repr(level) in str(caught.value)


@pytest.mark.parametrize("level", ["debug", "INFO", " Warning ", logging.CRITICAL])
def test_good_levels(level: str | int, out: io.StringIO) -> None:
    setup_logging(level, out)
    get_logger("x").critical("c")
    assert [line["level"] for line in lines(out)] == ["critical"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("daemon.fetcher", "coleta.fetcher"),
        ("fetcher", "coleta.fetcher"),
        ("coleta.writer", "coleta.writer"),
        ("daemon", "coleta"),
    ],
)
def test_logger_names(name: str, expected: str) -> None:
    assert get_logger(name).name == expected
