"""A paginated run's progress: where it is, what its published pages added up to, and which
of them JetStream has confirmed.

Marked in the ``<prefix>_progress`` bucket every 50 pages or every second, and when the API
fails, so a retry starts at the page that failed (after a crash, at the last mark). URLs are
stored redacted and restored from the run's first request.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import msgspec

from contracts import CollectCommand
from daemon import _records, _tracing
from daemon._bus import Bus, Pending
from daemon._http import Fetched
from daemon._pagination import PageState, Pagination
from daemon.settings import SourceConfig

__all__ = ["PagesInFlight", "Progress", "paging", "param_value", "progress_key", "records_path"]


def records_path(source: SourceConfig) -> str | None:
    if source.records_path is not None:
        return source.records_path
    return source.pagination.records_path if source.pagination is not None else None


def paging(source: SourceConfig) -> Pagination | None:
    """The source's pagination; its records are the source's ``records_path`` unless it
    names its own."""
    p = source.pagination
    if p is not None and p.records_path is None and source.records_path is not None:
        p = msgspec.structs.replace(p, records_path=source.records_path)
    return p


def param_value(cursor: Any, initial: str | None) -> str | None:
    """The incremental cursor as a query parameter value (strings as they are)."""
    if cursor is None:
        return initial
    return cursor if isinstance(cursor, str) else msgspec.json.encode(cursor).decode()


def progress_key(command: CollectCommand) -> str:
    """A KV key for the run (keys allow only ``[-/_=.a-zA-Z0-9]``; run ids have ``@``…)."""
    return hashlib.sha256(f"{command.run_id}/r{command.replay}".encode()).hexdigest()


@dataclass(slots=True)
class Progress:
    """Where a run is, and what its published pages added up to (kept in the progress
    bucket between attempts). URLs are kept redacted there: a redacted query value or a
    dropped ``user:pass@`` is restored from the run's first request when loaded."""

    state: PageState = field(default_factory=PageState)
    run_bytes: int = 0
    run_rows: int = 0
    #: The incremental cursor so far: the largest tracked field among the run's records.
    cursor: Any = None

    @property
    def page(self) -> int:
        return self.state.page

    def add(self, source: SourceConfig, fetched: Fetched) -> None:
        """Count a fetched page (before it is published)."""
        path = records_path(source)
        self.run_bytes += fetched.size
        if not (
            source.granularity == "record"
            or source.incremental is not None
            or _records.is_json_lines_type(fetched.content_type)
        ):
            self.run_rows += 1  # one row, the page whole: no need to read a spooled body
            return
        body = fetched.content()
        split = _records.split_page(
            fetched.content_type, body, granularity=source.granularity, records_path=path
        )
        self.run_rows += 1 if split is None else len(split.texts)
        if source.incremental is not None:
            # The rows' split already holds the records, unless pages are stored whole.
            if split is not None:
                found = split.values
            elif source.granularity == "record":
                found = []
            else:
                found = _records.records(fetched.content_type, body, records_path=path)
            self.cursor = _records.cursor_max(self.cursor, found, source.incremental.field)

    def dump(self) -> bytes:
        state = PageState(
            page=self.state.page,
            url=_tracing.redact_url(self.state.url) if self.state.url else None,
            records_seen=self.state.records_seen,
            seen=[_redact_seen(key) for key in self.state.seen],
        )
        return msgspec.json.encode(
            {
                "state": msgspec.Raw(state.to_json()),
                "run_bytes": self.run_bytes,
                "run_rows": self.run_rows,
                "cursor": self.cursor,
            }
        )

    @classmethod
    def load(cls, data: bytes, first_url: httpx.URL) -> Progress:
        raw = msgspec.json.decode(data)
        state = PageState.from_json(msgspec.json.encode(raw["state"]))
        if state.url is not None:
            state.url = _unredact(state.url, first_url)
        state.seen = [
            f"url:{_unredact(key[4:], first_url)}" if key.startswith("url:") else key
            for key in state.seen
        ]
        return cls(
            state=state,
            run_bytes=int(raw.get("run_bytes", 0)),
            run_rows=int(raw.get("run_rows", 0)),
            cursor=raw.get("cursor"),
        )


def _redact_seen(key: str) -> str:
    return f"url:{_tracing.redact_url(key[4:])}" if key.startswith("url:") else key


def _unredact(url: str, first: httpx.URL) -> str:
    """Put back what ``redact_url`` took out, from the run's first request."""
    target = httpx.URL(url)
    secret = {
        name: first.params[name]
        for name, value in target.params.multi_items()
        if value == _tracing.REDACTED and name in first.params
    }
    if secret:
        target = target.copy_merge_params(secret)
    if first.userinfo and not target.userinfo and target.host == first.host:
        target = target.copy_with(username=first.username, password=first.password)
    return str(target)


#: Pages of one run sent without waiting for their acks.
_PAGES_IN_FLIGHT = 64
#: A paginated run's progress is marked every this many pages, or this often.
_MARK_EVERY_PAGES = 50
_MARK_EVERY_S = 1.0


class PagesInFlight:
    """A run's pages sent but not yet confirmed, and its progress marks.

    Up to ``_PAGES_IN_FLIGHT`` pages travel unconfirmed, so fetching the next page overlaps
    with JetStream storing the last ones. The run's progress is marked in the progress bucket
    (after confirming every page before it) every ``_MARK_EVERY_PAGES`` pages or
    ``_MARK_EVERY_S`` seconds: a crash repeats at most that much, and repeated pages are
    de-duplicated (message id, then the writer's unique key).
    """

    def __init__(self, bus: Bus, key: str, progress: Progress) -> None:
        self._bus = bus
        self._key = key
        self.progress = progress
        self._pending: deque[Pending] = deque()
        self._marked_page = progress.page
        self._marked_at = anyio.current_time()

    async def add(self, pending: Pending) -> None:
        self._pending.append(pending)
        if len(self._pending) > _PAGES_IN_FLIGHT:
            await self._bus.confirm(self._pending.popleft())

    async def confirm_all(self) -> None:
        while self._pending:
            await self._bus.confirm(self._pending[0])
            self._pending.popleft()

    def mark_due(self) -> bool:
        return (
            self.progress.page - self._marked_page >= _MARK_EVERY_PAGES
            or anyio.current_time() - self._marked_at >= _MARK_EVERY_S
        )

    async def mark(self) -> None:
        """Confirm the pages sent, then record where the run is."""
        await self.confirm_all()
        if self.progress.page == self._marked_page:
            return
        await self._bus.kv_put(self._bus.progress, self._key, self.progress.dump())
        self._marked_page = self.progress.page
        self._marked_at = anyio.current_time()

    def forget(self) -> None:
        """The run is over or abandoned: stop waiting for acks still outstanding."""
        while self._pending:
            self._pending.popleft().forget()
