"""What the Prometheus tests read: Debian's binaries, the README's metrics table, the metric
names in the alert rules and the dashboard, and how an OpenTelemetry name is scraped."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests import ROOT

ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "ops" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "coleta.json"


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; the test fails (never skips) without it."""
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found on PATH: install Debian's prometheus package "
            "(apt-get install prometheus); .ci/run does so when promtool is missing",
            pytrace=False,
        )
    return found


# -- the README's table --------------------------------------------------------------------------
@dataclass(frozen=True)
class Documented:
    """One row of the README's "### Metrics" table."""

    name: str  # the OpenTelemetry name, ``coleta.runs``
    kind: str  # counter, histogram or gauge
    unit: str  # UCUM, ``s``, ``By``, ``{run}``

    def series(self) -> frozenset[str]:
        """The ``__name__``s Prometheus stores for it, by the rules of the SDK's Prometheus
        exporter: non-alphanumerics become ``_``, the unit is appended unless the name already
        ends with it (``{…}`` annotations are dropped, ``1`` adds nothing), counters end in
        ``_total`` and histograms are ``_bucket``, ``_sum`` and ``_count``."""
        base = re.sub(r"[^a-zA-Z0-9:]+", "_", self.name)
        unit = re.sub(r"\{.*\}", "", self.unit)
        assert unit in _UNIT_SUFFIXES, f"{self.name}: unit {self.unit!r} has no suffix here yet"
        if (suffix := _UNIT_SUFFIXES[unit]) and not base.endswith(f"_{suffix}"):
            base = f"{base}_{suffix}"
        if self.kind == "counter":
            return frozenset({f"{base}_total"})
        if self.kind == "histogram":
            return frozenset({f"{base}_bucket", f"{base}_sum", f"{base}_count"})
        assert self.kind == "gauge", f"{self.name}: unknown kind {self.kind!r}"
        return frozenset({base})


#: OpenTelemetry's unit → Prometheus suffix, for the units the README's table uses.
_UNIT_SUFFIXES = {"": "", "1": "", "s": "seconds", "ms": "milliseconds", "By": "bytes"}


def readme_metrics() -> list[Documented]:
    """Every row of the table under the README's "### Metrics" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n### Metrics\n", 1)[1].split("\n#", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and cells[0].startswith("`"):
            rows.append(Documented(cells[0].strip("`"), cells[1], cells[2].strip("`")))
    return rows


# -- PromQL ----------------------------------------------------------------------------------------
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: An identifier not glued to a number (``1e3``, ``5m``) or a label name.
_IDENTIFIER = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
    | {"group_left", "group_right", "start", "end"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions or
    aggregations (followed by ``(``), keywords, label names (inside ``{}`` or a ``by (…)``
    list), string contents or durations."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for found in _IDENTIFIER.finditer(text):
        word = found.group()
        if word.lower() in _KEYWORDS or text[found.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def rule_exprs() -> dict[str, str]:
    """Alert name → its expression, from ops/prometheus/alerts.yml."""
    rules = yaml.safe_load(ALERTS.read_text())
    return {
        rule["alert"]: rule["expr"]
        for group in rules["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def dashboard_exprs() -> dict[str, str]:
    """``panel title #n`` → expression of every query of ops/grafana/coleta.json (rows too)."""
    found: dict[str, str] = {}

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for n, target in enumerate(panel.get("targets", [])):
                if target.get("expr"):
                    found[f"{panel.get('title')} #{n}"] = target["expr"]
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found
