"""coleta's bus contracts: every message on NATS is one of these msgspec Structs, as JSON."""

from contracts._base import UtcDatetime, WireStruct, decoder, encode
from contracts.commands import CollectCommand, Trigger
from contracts.payloads import (
    DeadLetter,
    FetchFailed,
    FetchStarted,
    RawPayload,
    RunEvent,
    RunMissed,
)
from contracts.service import (
    ComponentHealth,
    DayMark,
    DayOutcome,
    DlqReplayReply,
    DlqReplayRequest,
    ErrorDetail,
    ErrorReply,
    HealthReply,
    RunInfo,
    RunsReply,
    RunsRequest,
    RunStatus,
    SourceStatus,
    StatusReply,
    TriggerReply,
    TriggerRequest,
)
from contracts.subjects import DEFAULT_PREFIX, Subjects

__all__ = [
    "DEFAULT_PREFIX",
    "CollectCommand",
    "ComponentHealth",
    "DayMark",
    "DayOutcome",
    "DeadLetter",
    "DlqReplayReply",
    "DlqReplayRequest",
    "ErrorDetail",
    "ErrorReply",
    "FetchFailed",
    "FetchStarted",
    "HealthReply",
    "RawPayload",
    "RunEvent",
    "RunInfo",
    "RunMissed",
    "RunStatus",
    "RunsReply",
    "RunsRequest",
    "SourceStatus",
    "StatusReply",
    "Subjects",
    "Trigger",
    "TriggerReply",
    "TriggerRequest",
    "UtcDatetime",
    "WireStruct",
    "decoder",
    "encode",
]
