"""JSON Schemas of the contracts, generated into ``contracts/schemas/``.

Run ``python -m contracts._schemas`` after changing a contract; a test fails while the files on
disk differ from what the code generates, so the published schemas never drift.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec

from contracts.commands import CollectCommand
from contracts.payloads import DeadLetter, RunEvent
from contracts.service import (
    BackfillReply,
    BackfillRequest,
    DlqReplayReply,
    DlqReplayRequest,
    ErrorReply,
    HealthReply,
    RunProgressReply,
    RunProgressRequest,
    RunsReply,
    RunsRequest,
    StatusReply,
    StatusRequest,
    TriggerReply,
    TriggerRequest,
)
from contracts.state import SourceState

SCHEMA_DIR = Path(__file__).parent / "schemas"

#: file stem → contract; one schema per contract (and per subject family).
CONTRACTS: dict[str, Any] = {
    "collect_command": CollectCommand,
    "run_event": RunEvent,
    "trigger_request": TriggerRequest,
    "trigger_reply": TriggerReply,
    "runs_request": RunsRequest,
    "runs_reply": RunsReply,
    "status_request": StatusRequest,
    "status_reply": StatusReply,
    "health_reply": HealthReply,
    "error_reply": ErrorReply,
    "dead_letter": DeadLetter,
    "dlq_replay_request": DlqReplayRequest,
    "dlq_replay_reply": DlqReplayReply,
    "backfill_request": BackfillRequest,
    "backfill_reply": BackfillReply,
    "run_progress_request": RunProgressRequest,
    "run_progress_reply": RunProgressReply,
    "source_state": SourceState,
}


def render() -> dict[str, bytes]:
    """Every schema file's name and exact content."""
    out: dict[str, bytes] = {}
    for stem, contract in CONTRACTS.items():
        schema = msgspec.json.schema(contract)
        out[f"{stem}.schema.json"] = (
            msgspec.json.format(msgspec.json.encode(schema), indent=2) + b"\n"
        )
    return out


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in render().items():
        path = directory / name
        path.write_bytes(content)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write():
        sys.stdout.write(f"{path}\n")
