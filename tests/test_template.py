"""Templates in a source's url, params and body, rendered with the run's window."""

from __future__ import annotations

import re

import pytest

from daemon.template import check_template, render, render_value
from tests._collect import window

KNOWN = "(known: {scheduled_for}, {interval_start}, {interval_end}, {source}, {run_id})"


def exactly(message: str) -> str:
    """A ``match`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def test_scheduled_for_in_utc() -> None:
    assert render("{scheduled_for:%Y-%m-%d %H:%M}", window()) == "2026-03-14 23:30"


def test_scheduled_for_in_the_source_timezone() -> None:
    # 23:30Z is already 08:30 the next day in Tokyo.
    assert render("/v1/{scheduled_for:%Y-%m-%d}", window("Asia/Tokyo")) == "/v1/2026-03-15"


def test_interval_start_and_end() -> None:
    tokyo = window("Asia/Tokyo")

    assert render("{interval_start:%Y-%m-%d %H:%M %Z}", tokyo) == "2026-03-14 08:30 JST"
    assert render("{interval_end:%Y-%m-%d}", tokyo) == "2026-03-15"


def test_no_spec_renders_iso_8601_with_offset() -> None:
    assert render("{scheduled_for}", window("Asia/Tokyo")) == "2026-03-15T08:30:00+09:00"
    assert render("{interval_start}", window()) == "2026-03-13T23:30:00+00:00"


def test_strings_and_literal_braces() -> None:
    rendered = render("{{literal}} {source}/{run_id} {{{source}}}", window())

    assert rendered == "{literal} rates/rates@20260314T233000Z {rates}"


@pytest.mark.parametrize(
    "template",
    ["{scheduled_for.year}", "{scheduled_for[0]}", "{nope}", "{0}"],
)
def test_only_known_names_are_accepted(template: str) -> None:
    with pytest.raises(
        ValueError, match=exactly(f"unknown placeholder {template} in {template!r} {KNOWN}")
    ):
        check_template(template)


def test_attribute_access_refused_at_render_too() -> None:
    # A template that slipped past validation still cannot reach into the datetime.
    with pytest.raises(ValueError, match=exactly("unknown placeholder {scheduled_for.tzinfo}")):
        render("/{scheduled_for.tzinfo}", window())


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{source!r}", "conversions like !r are not supported in '{source!r}'"),
        (
            "{scheduled_for:{source}}",
            "nested placeholders are not supported in '{scheduled_for:{source}}'",
        ),
        ("/path/{", "bad template '/path/{': Single '{' encountered in format string"),
        ("/path/}", "bad template '/path/}': Single '}' encountered in format string"),
    ],
)
def test_malformed_templates(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=exactly(message)):
        check_template(template)


@pytest.mark.parametrize(
    ("template", "rendered"),
    [
        (
            "https://api.example/{scheduled_for:%Y-%m-%d}?from={interval_start:%H:%M}",
            "https://api.example/2026-03-14?from=23:30",
        ),
        (
            "{source}-{run_id}-{interval_end}",
            "rates-rates@20260314T233000Z-2026-03-14T23:30:00+00:00",
        ),
        ("no placeholders, {{only braces}}", "no placeholders, {only braces}"),
    ],
)
def test_valid_templates_pass_the_check_and_render(template: str, rendered: str) -> None:
    check_template(template)  # raises on a bad template

    assert render(template, window()) == rendered


def test_render_value_renders_nested_body() -> None:
    body = {
        "day": "{scheduled_for:%d}",
        "tags": ["{source}", {"run": "{run_id}"}, 3, None, True],
        "filter": {"since": "{interval_start:%Y-%m-%d}", "limit": 1.5},
    }

    assert render_value(body, window("Asia/Tokyo")) == {
        "day": "15",
        "tags": ["rates", {"run": "rates@20260314T233000Z"}, 3, None, True],
        "filter": {"since": "2026-03-14", "limit": 1.5},
    }
