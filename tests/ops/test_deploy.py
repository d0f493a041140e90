"""What ships for deployment: the compose file, the container image recipe, the systemd unit."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from tests import ROOT

SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"


def test_the_compose_file_follows_the_compose_specification() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    services = compose["services"]
    assert {"nats", "postgres", "coleta"} <= services.keys()
    assert "-js" in services["nats"]["command"]
    assert any(v.endswith(":/data") for v in services["nats"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    coleta = services["coleta"]
    assert coleta["environment"]["NATS_URL"] == "nats://nats:4222"
    assert coleta["environment"]["DATABASE_URL"].startswith("postgresql://")
    assert any(v.endswith(":/etc/coleta/coleta.toml:ro") for v in coleta["volumes"])
    assert coleta["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Metrics for Prometheus, on every interface of the container, published on the host.
    assert coleta["environment"]["OTEL_METRICS_EXPORTER"] == "prometheus"
    assert coleta["environment"]["OTEL_EXPORTER_PROMETHEUS_HOST"] == "0.0.0.0"
    assert coleta["environment"]["OTEL_EXPORTER_PROMETHEUS_PORT"] == "9464"
    assert coleta["ports"] == ["${COLETA_METRICS_PORT:-127.0.0.1:9464}:9464"]
    # The container is healthy while the daemon is: a source whose API is down is no reason
    # to restart it (coleta health without the flag says degraded).
    assert coleta["healthcheck"]["test"][:4] == ["CMD", "coleta", "health", "--ignore-sources"]


def test_the_schema_rejects_what_compose_would_reject() -> None:
    """The validation above is not vacuous: a misspelt key fails it."""
    schema = json.loads(SCHEMA.read_text())
    bad = {"services": {"coleta": {"image": "coleta", "enviroment": {"A": "1"}}}}
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(bad))
    assert len(errors) == 1
    assert "enviroment" in errors[0].message


def test_the_containerfile_is_multi_stage_non_root_and_checks_health() -> None:
    lines = [
        line.strip()
        for line in (ROOT / "Containerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert len(froms) == 2
    assert froms[0].endswith(" AS build")
    assert any(line.startswith("COPY --from=build /opt/coleta /opt/coleta") for line in lines)
    assert any("-r requirements.lock" in line for line in lines)
    (user,) = [line for line in lines if line.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    text = "\n".join(lines)
    assert 'CMD ["coleta", "health", "--ignore-sources"' in text
    assert "COLETA_CONFIG=/etc/coleta/coleta.toml" in text


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string((ROOT / "ops" / "coleta.service").read_text())
    return unit


def test_the_systemd_unit_is_valid(tmp_path: Path) -> None:
    """`systemd-analyze verify` where systemd is installed; the unit's keys in any case."""
    unit = _unit()
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/opt/coleta/bin/coleta run"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["EnvironmentFile"] == "-/etc/coleta/coleta.env"
    assert service["LoadCredential"].startswith("api_token:")
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "StateDirectory": "coleta",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert service[key] == value, key
    assert int(service["WatchdogSec"]) > 0
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # no systemd here: the parse above is the check
    # verify wants ExecStart to exist: point it at this interpreter's coleta.
    coleta = Path(sys.executable).parent / "coleta"
    copy = tmp_path / "coleta.service"
    copy.write_text(
        (ROOT / "ops" / "coleta.service").read_text().replace("/opt/coleta/bin/coleta", str(coleta))
    )
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
