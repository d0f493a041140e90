"""Bus contracts: published schemas, public surface, wire round trips and evolution rules."""

from __future__ import annotations

import json
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

import contracts
from contracts import (
    CollectCommand,
    ComponentHealth,
    ErrorDetail,
    ErrorReply,
    FetchFailed,
    FetchStarted,
    HealthReply,
    RawPayload,
    RunEvent,
    RunInfo,
    RunsReply,
    RunsRequest,
    SourceStatus,
    StatusReply,
    TriggerReply,
    TriggerRequest,
    _schemas,
    decoder,
    encode,
)

REGENERATE = "run `python -m contracts._schemas` and commit the result"

SLOT = datetime(2026, 1, 1, 7, tzinfo=UTC)
LATER = SLOT + timedelta(seconds=3, microseconds=250)
LISBON_SUMMER = timezone(timedelta(hours=1))

RUN = RunInfo(
    run_id="rates@20260101T070000Z",
    source="rates",
    trigger="schedule",
    scheduled_for=SLOT,
    status="stored",
    attempts=2,
    pages=1,
    rows=1,
    bytes=321,
    http_status=200,
    trace_id="0af7651916cd43dd8448eb211c80319c",
    queued_at=SLOT,
    started_at=LATER,
    finished_at=LATER,
)

EXAMPLES: list[Any] = [
    CollectCommand(
        run_id="rates@20260101T070000Z",
        source="rates",
        scheduled_for=SLOT,
        interval_start=SLOT - timedelta(days=1),
        trigger="catchup",
        requested_at=LATER,
    ),
    FetchStarted(
        run_id="rates@20260101T070000Z",
        source="rates",
        scheduled_for=SLOT,
        attempt=2,
        started_at=LATER,
    ),
    RawPayload(
        run_id="rates@20260101T070000Z",
        source="rates",
        trigger="manual",
        scheduled_for=SLOT,
        page=3,
        last=False,
        fetched_at=LATER,
        url="https://api.example/rates?api_key=REDACTED",
        method="POST",
        status_code=200,
        headers={"content-type": "application/json"},
        content_type="application/json",
        body=b'\x00\xff{"not": "utf-8 safe"}',
        elapsed_ms=12.5,
        run_bytes=4096,
    ),
    FetchFailed(
        run_id="rates@20260101T070000Z",
        source="rates",
        scheduled_for=SLOT,
        failed_at=LATER,
        error_code="http_status",
        error="HTTP 404 Not Found from https://api.example/rates",
        http_status=404,
        url="https://api.example/rates",
    ),
    TriggerRequest(source="rates", scheduled_for=datetime(2026, 6, 1, 8, tzinfo=LISBON_SUMMER)),
    TriggerReply(run_id="rates@20260101T070000Z", source="rates", scheduled_for=SLOT),
    RunsRequest(source="rates", limit=5),
    RunsReply(runs=[RUN]),
    StatusReply(
        version="0.1.0",
        uptime_s=12.5,
        bus=ComponentHealth(ok=True),
        database=ComponentHealth(ok=False, detail="connection refused"),
        sources=[
            SourceStatus(
                name="rates",
                schedule="0 7 * * *",
                timezone="UTC",
                next_run=SLOT + timedelta(days=1),
                last_run=RUN,
                consecutive_failures=1,
                rows=10,
            )
        ],
    ),
    HealthReply(
        status="degraded",
        reason="database down",
        checks={"database": ComponentHealth(ok=False, detail="timeout")},
    ),
    ErrorReply(error=ErrorDetail(code="unknown_source", message="no source named 'x'")),
]


# -- generated JSON Schemas


def test_schemas_on_disk_match_the_contracts() -> None:
    expected = _schemas.render()
    stale = sorted(
        name
        for name, content in expected.items()
        if not (_schemas.SCHEMA_DIR / name).is_file()
        or (_schemas.SCHEMA_DIR / name).read_bytes() != content
    )

    assert not stale, f"schemas out of date: {', '.join(stale)}; {REGENERATE}"


def test_no_stale_schema_files() -> None:
    on_disk = {path.name for path in _schemas.SCHEMA_DIR.iterdir()}
    extra = sorted(on_disk - set(_schemas.render()))

    assert not extra, (
        f"schema files no contract generates: {', '.join(extra)}; delete them"
        " (or list the contract in contracts._schemas.CONTRACTS) and"
        f" {REGENERATE}"
    )


def test_schemas_describe_the_contracts() -> None:
    rendered = _schemas.render()

    assert sorted(rendered) == sorted(f"{stem}.schema.json" for stem in _schemas.CONTRACTS)
    command = json.loads(rendered["collect_command.schema.json"])
    definition = command["$defs"]["CollectCommand"]
    assert definition["required"] == ["run_id", "source", "scheduled_for", "requested_at"]
    events = json.loads(rendered["run_event.schema.json"])
    assert sorted(events["$defs"]) == sorted(kind.__name__ for kind in typing.get_args(RunEvent))


# -- public surface


def _isort_key(name: str) -> tuple[int, str]:
    """ruff RUF022 order: CONSTANTS, then CamelCase, then everything else."""
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_all_is_sorted() -> None:
    assert contracts.__all__ == sorted(contracts.__all__, key=_isort_key)


def test_all_equals_the_public_names() -> None:
    public = {
        name
        for name, value in vars(contracts).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }

    assert set(contracts.__all__) == public
    assert len(contracts.__all__) == len(public)


# -- the wire


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Any) -> None:
    assert decoder(type(message)).decode(encode(message)) == message


#: A tagged union is no ``type[T]`` to ``decoder``: its decoder is built here, typed.
RUN_EVENTS: msgspec.json.Decoder[RunEvent] = msgspec.json.Decoder(RunEvent)


@pytest.mark.parametrize(
    ("message", "kind"),
    [(EXAMPLES[1], "started"), (EXAMPLES[2], "page"), (EXAMPLES[3], "failed")],
    ids=["started", "page", "failed"],
)
def test_run_event_decodes_by_kind(message: Any, kind: str) -> None:
    wire = encode(message)

    assert json.loads(wire)["kind"] == kind
    decoded = RUN_EVENTS.decode(wire)
    assert type(decoded) is type(message)
    assert decoded == message


def test_unknown_run_event_kind_is_invalid() -> None:
    wire = json.loads(encode(EXAMPLES[1]))
    wire["kind"] = "paused"

    with pytest.raises(msgspec.ValidationError) as exc_info:
        RUN_EVENTS.decode(json.dumps(wire))
    assert str(exc_info.value) == "Invalid value 'paused' - at `$.kind`"


def test_binary_body_travels_as_base64() -> None:
    assert json.loads(encode(EXAMPLES[2]))["body"] == "AP97Im5vdCI6ICJ1dGYtOCBzYWZlIn0="


def test_unknown_fields_are_ignored() -> None:
    command = json.loads(encode(EXAMPLES[0]))
    command["priority"] = "high"
    reply = json.loads(encode(RunsReply(runs=[RUN])))
    reply["cursor"] = "abc"
    reply["runs"][0]["region"] = "eu"

    assert decoder(CollectCommand).decode(json.dumps(command)) == EXAMPLES[0]
    assert decoder(RunsReply).decode(json.dumps(reply)) == RunsReply(runs=[RUN])


def test_missing_defaults_are_filled() -> None:
    wire = b'{"run_id": "r", "source": "s", "scheduled_for": "2026-01-01T07:00:00Z",'
    wire += b' "requested_at": "2026-01-01T07:00:03Z"}'

    command = decoder(CollectCommand).decode(wire)

    assert command.interval_start is None
    assert command.trigger == "schedule"


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("run_id", "Object missing required field `run_id`"),
        ("requested_at", "Object missing required field `requested_at`"),
    ],
)
def test_missing_required_field_is_named(drop: str, message: str) -> None:
    wire = json.loads(encode(EXAMPLES[0]))
    del wire[drop]

    with pytest.raises(msgspec.ValidationError) as exc_info:
        decoder(CollectCommand).decode(json.dumps(wire))
    assert str(exc_info.value) == message


def test_missing_nested_field_names_its_path() -> None:
    wire = json.loads(encode(RunsReply(runs=[RUN])))
    del wire["runs"][0]["status"]

    with pytest.raises(msgspec.ValidationError) as exc_info:
        decoder(RunsReply).decode(json.dumps(wire))
    assert str(exc_info.value) == "Object missing required field `status` - at `$.runs[0]`"


@pytest.mark.parametrize(
    ("contract", "field", "path"),
    [
        (CollectCommand, "scheduled_for", "$.scheduled_for"),
        (CollectCommand, "requested_at", "$.requested_at"),
        (RunEvent, "started_at", "$.started_at"),
    ],
)
def test_naive_datetimes_are_rejected(contract: Any, field: str, path: str) -> None:
    message = EXAMPLES[0] if contract is CollectCommand else EXAMPLES[1]
    wire = json.loads(encode(message))
    wire[field] = "2026-01-01T07:00:00"

    with pytest.raises(msgspec.ValidationError) as exc_info:
        decoder(contract).decode(json.dumps(wire))
    assert str(exc_info.value) == f"Expected `datetime` with a timezone component - at `{path}`"


def test_aware_datetimes_keep_their_instant() -> None:
    wire = encode(
        TriggerRequest(source="rates", scheduled_for=datetime(2026, 6, 1, 8, tzinfo=LISBON_SUMMER))
    )

    decoded = decoder(TriggerRequest).decode(wire)

    assert decoded.scheduled_for == datetime(2026, 6, 1, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        (0, "Expected `int` >= 1 - at `$.limit`"),
        (1001, "Expected `int` <= 1000 - at `$.limit`"),
    ],
)
def test_runs_request_limit_bounds(limit: int, message: str) -> None:
    with pytest.raises(msgspec.ValidationError) as exc_info:
        decoder(RunsRequest).decode(json.dumps({"limit": limit}))
    assert str(exc_info.value) == message
