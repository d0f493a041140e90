"""The one id scheme: run ids, message ids, object names, progress keys and replay numbers.

A run id names a slot: ``<source>@<UTC slot>`` (``orders@20260501T100000Z``), so every ticker,
replica or restart that publishes a slot names the same run. A manual run adds
``-manual-<random>``, a backfill of a slot already tried ``-backfill-<n>``.

Every message id (JetStream's ``Nats-Msg-Id``, de-duplicated within ``duplicate_window_s``)
is built here from the run id and the run's ``replay`` number (how often it was replayed from
the dead-letter stream), so a replay is never taken for a duplicate of its first attempt:

* a collect command: its run id; a replayed one ``<run id>/replay/<n>``;
* the run's events: ``<run id>/r<replay>/<event>`` (``started/<attempt>``, ``unchanged``,
  ``failed``, ``dlq``), and a page ``<run id>/r<replay>/a<attempt>/p<page>``, which also names
  its body in the object store when the body is too large for a message;
* a missed slot: ``<run id>/missed``;
* a message moved between streams or replayed: ``defer/<seq>/<run id>``, ``undefer/<seq>``,
  ``dlq-replay/<seq>``; a dead letter ``dlq/<stream>/<seq>`` (its large original, by the same
  name, in the object store).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import UTC, datetime

from contracts import CollectCommand

__all__ = [
    "MAX_ECHO",
    "UNDEFER_PREFIX",
    "backfill_number",
    "backfill_run_id",
    "dead_letter_id",
    "dead_letter_object",
    "defer_id",
    "event_id",
    "manual_run_id",
    "missed_id",
    "page_id",
    "progress_key",
    "replay_id",
    "republish_id",
    "run_id_for",
    "undefer_id",
]

#: A message id repeats at most this much of a run id (or a subject) coming from elsewhere.
MAX_ECHO = 200


def run_id_for(source: str, scheduled_for: datetime, *, suffix: str = "") -> str:
    """Deterministic run id of a slot: ``<source>@<UTC slot>``; also the ``Nats-Msg-Id``."""
    stamp = scheduled_for.astimezone(UTC).strftime("%Y%m%dT%H%M%S")
    frac = scheduled_for.microsecond
    base = f"{source}@{stamp}{f'.{frac:06d}' if frac else ''}Z"
    return f"{base}-{suffix}" if suffix else base


def manual_run_id(source: str, scheduled_for: datetime) -> str:
    """A manual run's id: never the slot's own, so a trigger never collides with a tick."""
    return run_id_for(source, scheduled_for, suffix=f"manual-{secrets.token_hex(3)}")


def backfill_run_id(slot_run_id: str, number: int) -> str:
    """The ``number``-th backfill of a slot whose own id is taken."""
    return f"{slot_run_id}-backfill-{number}"


def backfill_number(slot_run_id: str, run_id: str) -> int | None:
    """Which backfill of the slot ``run_id`` is; None when it is none."""
    found = re.fullmatch(re.escape(slot_run_id) + r"-backfill-(\d+)", run_id)
    return int(found[1]) if found else None


def event_id(command: CollectCommand, event: str) -> str:
    """The ``Nats-Msg-Id`` of one event of the run: unique per run, replay and ``event``."""
    return f"{command.run_id}/r{command.replay}/{event}"


def page_id(command: CollectCommand, attempt: int, page: int) -> str:
    """A page's message id, and its body's name in the object store. The attempt is part of
    it: a page fetched again after a crash may differ, and must reach the writer (which
    stores identical content once) rather than be dropped as a duplicate."""
    return event_id(command, f"a{attempt}/p{page}")


def missed_id(run_id: str) -> str:
    """The message id of a slot recorded as missed."""
    return f"{run_id}/missed"


def replay_id(command: CollectCommand) -> str:
    """The message id of a command replayed from the dead-letter stream (its ``replay``
    already counted up)."""
    return f"{command.run_id}/replay/{command.replay}"


def republish_id(seq: int) -> str:
    """The message id of a dead letter (not a command) sent back to its subject."""
    return f"dlq-replay/{seq}"


def defer_id(seq: int, run_id: str) -> str:
    """The message id of a command set aside on the deferred stream."""
    return f"defer/{seq}/{run_id[:MAX_ECHO]}"


#: How the message id of a deferred command moved back to the collect stream begins.
UNDEFER_PREFIX = "undefer/"


def undefer_id(seq: int) -> str:
    """The message id of a deferred command moved back to the collect stream."""
    return f"{UNDEFER_PREFIX}{seq}"


def dead_letter_id(stream: str | None, subject: str, seq: int) -> str:
    """A dead letter's message id, when its stage gives none: its original's place."""
    return f"dlq/{stream or subject}/{seq}"


def dead_letter_object(stream: str | None, seq: int, original: bytes) -> str:
    """The object store name of an original too large to travel in its dead letter."""
    return f"dlq/{stream or 'core'}/{seq or hashlib.sha256(original).hexdigest()}"


def progress_key(command: CollectCommand) -> str:
    """A paginated run's key in the progress bucket (KV keys allow only ``[-/_=.a-zA-Z0-9]``;
    run ids have ``@``…)."""
    return hashlib.sha256(f"{command.run_id}/r{command.replay}".encode()).hexdigest()
