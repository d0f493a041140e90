"""``freshness_s`` and ``failures_before_degraded``: defaults from the schedule, and
``coleta check-config`` naming the key and the value when one is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from daemon.cli import main
from daemon.settings import Settings, SourceConfig, format_duration

HOUR = 3600.0


def src(schedule: str = "0 6 * * *", **extra: Any) -> dict[str, Any]:
    return {"name": "a", "url": "http://x", "schedule": schedule, **extra}


@pytest.mark.parametrize(
    ("schedule", "timezone", "expected_s"),
    [
        ("0 6 * * *", "UTC", 26 * HOUR),  # daily: 24 h + 2 h
        ("30 2 * * *", "Europe/Lisbon", 26 * HOUR),
        ("0 * * * *", "UTC", HOUR + 600),  # hourly: the 10-minute floor of the margin
        ("*/5 * * * *", "UTC", 300 + 600),
        ("0 6 * * 1", "UTC", 7 * 24 * HOUR + 14 * HOUR),  # weekly: + 1/12 of a week
        # Every 5 minutes on weekday working hours: the weekend is the longest pause.
        ("*/5 9-17 * * 1-5", "UTC", (63 * HOUR + 300) * 13 / 12),
        ("0 9 * * 1-5", "UTC", 72 * HOUR * 13 / 12),  # Friday to Monday
        ("0 0 1 * *", "UTC", 31 * 24 * HOUR * 13 / 12),  # monthly: the longest month
    ],
)
def test_the_default_freshness_is_the_longest_interval_and_a_margin(
    schedule: str, timezone: str, expected_s: float
) -> None:
    source = msgspec.convert(src(schedule, timezone=timezone), SourceConfig)
    assert source.freshness_s is None
    assert source.freshness_window_s == pytest.approx(expected_s)


def test_jitter_is_added_and_an_explicit_freshness_wins() -> None:
    jittered = msgspec.convert(src(jitter_s=300), SourceConfig)
    assert jittered.freshness_window_s == 26 * HOUR + 300
    explicit = msgspec.convert(src(freshness_s=30 * HOUR), SourceConfig)
    assert explicit.freshness_window_s == 30 * HOUR


def test_failures_before_degraded_per_source_or_top_level() -> None:
    settings = msgspec.convert(
        {"sources": [src(), src(name="b", failures_before_degraded=1)]}, Settings
    )
    a, b = settings.sources
    assert settings.failures_before_degraded == 3
    assert (settings.failures_limit(a), settings.failures_limit(b)) == (3, 1)
    top = msgspec.convert({"failures_before_degraded": 5, "sources": [src()]}, Settings)
    assert top.failures_limit(top.sources[0]) == 5


SOURCE = '[[sources]]\nname = "a"\nurl = "http://x"\nschedule = "0 6 * * *"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SOURCE + "freshness_s = 0\n", "sources[0].freshness_s: Expected `float` > 0.0 (got 0)"),
        (
            SOURCE + 'freshness_s = "26h"\n',
            "sources[0].freshness_s: Expected `float | null`, got `str` (got '26h')",
        ),
        (
            SOURCE + "freshness_s = 3600\n",
            "sources[0].freshness_s: 3600 must be longer than the schedule's longest interval"
            " (24h), or the source is late before each of its runs",
        ),
        (
            SOURCE + "failures_before_degraded = 0\n",
            "sources[0].failures_before_degraded: Expected `int` >= 1 (got 0)",
        ),
        (
            "failures_before_degraded = -2\n" + SOURCE,
            "failures_before_degraded: Expected `int` >= 1 (got -2)",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"coleta: {path}: {expected}\n"


def test_good_values_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.toml"
    path.write_text(
        "failures_before_degraded = 5\n"
        + SOURCE
        + "freshness_s = 93600\nfailures_before_degraded = 1\n"
    )
    assert main(["check-config", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (45, "45s"),
        (121, "2m1s"),
        (4200, "1h10m"),
        (26 * HOUR, "26h"),
        (47 * HOUR + 3599, "47h59m"),
        (63 * HOUR, "2d15h"),
        (366 * 24 * HOUR, "366d"),
        (float("inf"), "never"),
    ],
)
def test_durations_are_shown_in_at_most_two_units(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
