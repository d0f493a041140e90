"""ops/prometheus/alerts.yml: valid for promtool, and each alert unit-tested to fire."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.ops._prometheus import (
    ALERT_TESTS,
    ALERTS,
    binary,
    dashboard_exprs,
    metric_names,
    rule_exprs,
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in done.stdout


def test_promtool_unit_tests_pass() -> None:
    done = promtool("test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = set(rule_exprs())
    assert alerts == {
        "ColetaDown",
        "ColetaSourceFailing",
        "ColetaSourceLate",
        "ColetaDeadLettersGrowing",
        "ColetaConsumerLagGrowing",
    }
    assert alerts - firing == set()


def test_a_broken_unit_test_fails_promtool(tmp_path: Path) -> None:
    """The unit tests are not vacuous: expecting a firing alert too early fails them."""
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    tests["rule_files"] = [str(ALERTS)]
    for test in tests["tests"]:
        for case in test["alert_rule_test"]:
            if case["alertname"] == "ColetaDown" and case["exp_alerts"]:
                case["eval_time"] = "3m"  # down since 2m: not yet for the 2 minutes of `for`
    broken = tmp_path / "alerts.test.yml"
    broken.write_text(yaml.safe_dump(tests))
    done = promtool("test", "rules", str(broken))
    assert done.returncode == 1
    assert "alertname: ColetaDown" in done.stdout + done.stderr


def test_the_tokenizer_finds_the_metrics_of_each_expression() -> None:
    exprs = rule_exprs() | dashboard_exprs()
    found = {source: metric_names(expr) for source, expr in exprs.items()}
    assert [source for source, names in found.items() if not names] == []
    assert found["ColetaDown"] == {"up"}
    assert found["ColetaConsumerLagGrowing"] == {"coleta_consumer_lag"}
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, coleta_source) (rate(x_bucket{a="b(c)"}[5m])))'
        " > 1e3 and on (coleta_source) y offset 1h"
    ) == {"x_bucket", "y"}
