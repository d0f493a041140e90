"""Commands on ``<prefix>.collect.<source>``: "collect this source for this slot"."""

from __future__ import annotations

from typing import Literal

from contracts._base import UtcDatetime, WireStruct

__all__ = ["CollectCommand", "Trigger"]

#: Why a run exists; stored in ``collection_runs.trigger``.
Trigger = Literal["schedule", "manual", "backfill", "catchup"]


class CollectCommand(WireStruct, frozen=True, kw_only=True):
    """Published by the ticker (or a trigger request), consumed by the fetcher.

    ``run_id`` is deterministic for scheduled slots — ``<source>@<UTC slot>`` — and is also the
    JetStream ``Nats-Msg-Id``, so two tickers publishing the same slot make one run.
    """

    run_id: str
    source: str
    scheduled_for: UtcDatetime
    #: The previous scheduled time: the start of the window this run collects.
    interval_start: UtcDatetime | None = None
    trigger: Trigger = "schedule"
    requested_at: UtcDatetime
    #: Set on a command re-queued from the dead-letter stream: the run starts over.
    replay: int = 0
    #: Attempts this run already made before the command was set aside (a source busy
    #: elsewhere): its retry budget goes on counting from there.
    attempts_done: int = 0
