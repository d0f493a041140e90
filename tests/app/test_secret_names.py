"""A secret that is also a name the configuration shows everywhere is masked by name only.

Found by the compose stack (``.ci/containers``): its PostgreSQL password is ``coleta``, like
the bus prefix, so masking it by value turned every subject into ``REDACTED.collect.rates``.
"""

from __future__ import annotations

import logging

import pytest

from daemon.app import mask_secrets
from daemon.platform import redact as _redact
from daemon.settings import parse_settings


def test_a_password_equal_to_the_bus_prefix_leaves_subjects_readable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = parse_settings(
        {
            "bus_prefix": "coleta",
            "database_url": "postgresql://coleta:coleta@postgres:5432/coleta",
            "nats_url": "nats://n:4222",
            "sources": [],
        }
    )
    with _redact.registered() as registration, caplog.at_level(logging.WARNING):
        mask_secrets(registration, settings)
        assert _redact.redact_text("send coleta.collect.rates") == "send coleta.collect.rates"
        # Where it is sent, it is still masked.
        shown = _redact.redact_text("postgresql://coleta:coleta@postgres:5432/coleta")
        assert "coleta:coleta@" not in shown
    warned = [r for r in caplog.records if r.getMessage() == "secrets.same_as_a_name"]
    assert [r.__dict__["keys"] for r in warned] == [["database_url"]]


def test_a_real_password_is_still_masked_by_value() -> None:
    settings = parse_settings(
        {
            "bus_prefix": "coleta",
            "database_url": "postgresql://coleta:s3cr3t-pass@postgres:5432/coleta",
            "sources": [],
        }
    )
    with _redact.registered() as registration:
        mask_secrets(registration, settings)
        assert "s3cr3t-pass" not in _redact.redact_text("the password s3cr3t-pass leaked")
