"""What the bus keeps besides messages in flight: key-value buckets, the object store, and
messages read back from a stream by their place.

Every nats-py error leaves as the tree's (``errors.nats_errors``): ``BusUnavailable``, or
``None`` where "not there" is an answer (an absent key, a message already gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Awaitable
from typing import Any

import anyio
import nats.errors
import nats.js.errors
from nats.js.api import Header
from nats.js.kv import KeyValue

from daemon.errors import first_line, nats_errors
from daemon.platform.bus._messages import Original, Pending
from daemon.platform.bus._publish import Publishing

__all__ = ["Stored"]

#: Longest a body's trip through the object store may take before it counts as a bus failure.
_OBJECT_TIMEOUT_S = 60.0


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class Stored(Publishing):
    """Buckets, bodies and stream reads of a declared bus."""

    # -- key-value buckets -------------------------------------------------------------------

    async def kv_get(self, kv: KeyValue | None, key: str) -> bytes | None:
        """A key's value, or None when absent (or deleted)."""
        found = await self.kv_entry(kv, key)
        return found[0] if found is not None else None

    async def kv_entry(self, kv: KeyValue | None, key: str) -> tuple[bytes, int] | None:
        """A key's value and revision, or None when absent (or deleted)."""
        assert kv is not None, "declare() creates the buckets"
        with nats_errors(f"reading key {key}"):
            try:
                entry = await kv.get(key)
            except nats.js.errors.NotFoundError:  # KeyNotFoundError, KeyDeletedError
                return None
        return entry.value or b"", entry.revision or 0

    async def kv_put(self, kv: KeyValue | None, key: str, value: bytes) -> None:
        assert kv is not None, "declare() creates the buckets"
        with nats_errors(f"writing key {key}"):
            await kv.put(key, value)

    async def kv_create(self, kv: KeyValue | None, key: str, value: bytes) -> int | None:
        """Write ``key`` only if it is absent; its revision, or None when it is there."""
        assert kv is not None, "declare() creates the buckets"
        with nats_errors(f"creating key {key}"):
            try:
                return await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

    async def kv_update(
        self, kv: KeyValue | None, key: str, value: bytes, *, last: int
    ) -> int | None:
        """Write ``key`` only if its revision is ``last`` (compare-and-set); its new revision,
        or None when it is at another."""
        assert kv is not None, "declare() creates the buckets"
        with nats_errors(f"updating key {key}"):
            try:
                return await kv.update(key, value, last=last)
            except nats.js.errors.KeyWrongLastSequenceError:
                return None

    async def kv_delete(self, kv: KeyValue | None, key: str) -> None:
        """Forget a key; failing is harmless (the bucket's TTL forgets it too)."""
        assert kv is not None, "declare() creates the buckets"
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await kv.delete(key)

    async def kv_delete_at_later(self, bucket: str, key: str, *, last: int) -> Pending:
        """Delete ``key`` only if its revision is ``last``, without waiting for the answer:
        ``confirm`` it when the delete marker's revision is needed (its ``seq``); a failed
        delete (another revision, the bus refusing) raises there."""
        headers = {"KV-Operation": "DEL", Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(last)}
        pending = await self.send_raw(self.subjects.kv_key(bucket, key), b"", headers)
        # Never confirmed if the source does not run here again: retrieve a failure anyway.
        pending.future.add_done_callback(_retrieved)
        return pending

    # -- the object store --------------------------------------------------------------------

    async def put_body(self, name: str, body: bytes | io.BufferedIOBase) -> None:
        """Store a large body in the object store (chunked by JetStream): bytes, or a file read
        from its start a chunk at a time, so the body is never whole in memory."""
        assert self.bodies is not None, "declare() creates the bodies bucket"
        if not isinstance(body, bytes):
            body.seek(0)
        with nats_errors(f"storing body {name}"), anyio.fail_after(_OBJECT_TIMEOUT_S):
            await self.bodies.put(name, body)

    async def get_body(self, name: str, into: io.BufferedIOBase | None = None) -> bytes:
        """A body from the object store: written into ``into`` as its chunks arrive (nats-py
        otherwise gathers them, then copies the whole), and then empty; else in memory."""
        assert self.bodies is not None, "declare() creates the bodies bucket"
        # nats-py reads the chunks through an ordered consumer with no deadline of its own.
        with nats_errors(f"reading body {name}"), anyio.fail_after(_OBJECT_TIMEOUT_S):
            result = await self.bodies.get(name, writeinto=into)
        return b"" if into is not None else bytes(result.data or b"")

    async def delete_body(self, name: str) -> None:
        assert self.bodies is not None, "declare() creates the bodies bucket"
        with contextlib.suppress(nats.errors.Error, TimeoutError), anyio.fail_after(10):
            await self.bodies.delete(name)

    # -- messages read back from a stream ----------------------------------------------------

    async def message_at(
        self, stream: str, seq: int, *, subject: str | None = None, or_next: bool = False
    ) -> Original | None:
        """The message at ``seq`` in ``stream`` (with ``or_next``: the first at or after it,
        on ``subject`` if given), or None when there is none (deleted, aged out)."""
        with nats_errors(f"reading {stream} at {seq}"):
            try:
                raw = await self.js.get_msg(stream, seq=seq, subject=subject, next=or_next)
            except nats.js.errors.NotFoundError:
                return None
        if raw.seq is None:
            return None
        return Original(
            raw.subject or "", raw.data or b"", dict(raw.headers or {}), stream, raw.seq
        )

    async def delete_message(self, stream: str, seq: int) -> bool:
        """Remove one message from ``stream``; False when it was gone already."""
        with nats_errors(f"deleting {stream} message {seq}"):
            try:
                await self.js.delete_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                return False
        return True

    async def stream_bounds(self, stream: str) -> tuple[int, int]:
        """The first and the last sequence number ``stream`` holds."""
        with nats_errors(f"reading stream {stream}"):
            info = await self.js.stream_info(stream)
        return info.state.first_seq, info.state.last_seq

    async def subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        """Messages waiting in ``stream``, per subject matching ``subjects``."""
        with nats_errors(f"reading stream {stream}"):
            info = await self.js.stream_info(stream, subjects_filter=subjects)
        return dict(info.state.subjects or {})

    async def stream_problem(self, stream: str, timeout_s: float) -> str | None:
        """None when ``stream`` answers within ``timeout_s``; else what is wrong with it
        (``missing``, no answer, JetStream's error)."""
        return await _problem(self.js.stream_info(stream), timeout_s)

    async def consumer_problem(self, stream: str, consumer: str, timeout_s: float) -> str | None:
        """None when the durable ``consumer`` of ``stream`` answers within ``timeout_s``; else
        what is wrong with it, as ``stream_problem`` says it."""
        return await _problem(self.js.consumer_info(stream, consumer), timeout_s)

    async def consumer_backlog(self, stream: str, consumer: str, timeout_s: float) -> int:
        """Messages a durable consumer has not acked: pending plus unacked."""
        with nats_errors(f"reading consumer {consumer}"):
            info = await self.js.consumer_info(stream, consumer, timeout=timeout_s)
        return (info.num_pending or 0) + (info.num_ack_pending or 0)


async def _problem(info: Awaitable[object], timeout_s: float) -> str | None:
    """None when the ``info`` call answers within ``timeout_s``; else what went wrong."""
    try:
        with anyio.fail_after(timeout_s):
            await info
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except nats.js.errors.NotFoundError:
        return "missing"
    except nats.errors.Error as exc:
        return first_line(exc)
    return None
