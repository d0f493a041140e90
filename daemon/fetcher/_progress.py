"""A paginated run's progress: where it is, what its published pages added up to, and which
of them JetStream has confirmed.

Marked in the ``<prefix>_progress`` bucket every 50 pages or every second, and when the API
fails, so a retry starts at the page that failed (after a crash, at the last mark). URLs are
stored redacted and restored from the run's first request.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import httpx
import msgspec

from daemon import records
from daemon.fetcher._pagination import PageState
from daemon.fetcher._send import Fetched
from daemon.platform.bus import Bus, Pending
from daemon.platform.redact import REDACTED, redact_url
from daemon.settings import Pagination, SourceConfig

__all__ = ["PagesInFlight", "Progress", "paging", "param_value", "records_path"]


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


#: A page larger than this is decoded in a worker thread (a 256 KiB page takes about 1 ms).
_INLINE_DECODE_BYTES = 256 * 1024


def param_value(cursor: Any, initial: str | None) -> str | None:
    """The incremental cursor as a query parameter value (strings as they are)."""
    if cursor is None:
        return initial
    return cursor if isinstance(cursor, str) else msgspec.json.encode(cursor).decode()


class Progress(msgspec.Struct, kw_only=True):
    """Where a run is, and what its published pages added up to (kept in the progress
    bucket between attempts, as JSON). URLs are kept redacted there: a redacted query value or
    a dropped ``user:pass@`` is restored from the run's first request when loaded."""

    state: PageState = msgspec.field(default_factory=PageState)
    run_bytes: int = 0
    run_rows: int = 0
    #: The incremental cursor so far: the largest tracked field among the run's records.
    cursor: Any = None

    @property
    def page(self) -> int:
        return self.state.page

    async def add(self, source: SourceConfig, fetched: Fetched) -> records.PageFacts:
        """Count a fetched page (before it is published); what it says of the next page.

        The page is decoded once (``records.inspect_page``): inline when small, in a worker
        thread past ``_INLINE_DECODE_BYTES`` (a spooled page is read there too), so a large
        page never holds up the event loop.
        """
        self.run_bytes += fetched.size
        shape = records.PageShape(
            granularity=source.granularity,
            records_path=records_path(source),
            pagination=paging(source),
            cursor_field=source.incremental.field if source.incremental is not None else None,
        )
        if not records.needs_inspection(shape):
            facts = records.PageFacts()  # one row, the page whole: its body need not be read
        elif fetched.spool is None and fetched.size <= _INLINE_DECODE_BYTES:
            facts = records.inspect_page(shape, fetched.content_type, fetched.body)
        else:
            facts = await anyio.to_thread.run_sync(
                lambda: records.inspect_page(shape, fetched.content_type, fetched.content())
            )
        self.run_rows += facts.rows
        if source.incremental is not None:
            self.cursor = records.cursor_max(self.cursor, facts.cursor_values)
        return facts

    def dump(self) -> bytes:
        """The progress as the progress bucket keeps it: its URLs redacted."""
        state = msgspec.structs.replace(
            self.state,
            url=redact_url(self.state.url) if self.state.url else None,
            seen=[_redact_seen(key) for key in self.state.seen],
        )
        return _encode(msgspec.structs.replace(self, state=state))

    @classmethod
    def load(cls, data: bytes, first_url: httpx.URL) -> Progress:
        """A progress the bucket kept, its URLs restored from the run's first request."""
        progress = _decode(data)
        state = progress.state
        if state.url is not None:
            state.url = _unredact(state.url, first_url)
        state.seen = [
            f"url:{_unredact(key[4:], first_url)}" if key.startswith("url:") else key
            for key in state.seen
        ]
        return progress


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Progress).decode


def _redact_seen(key: str) -> str:
    return f"url:{redact_url(key[4:])}" if key.startswith("url:") else key


def _unredact(url: str, first: httpx.URL) -> str:
    """Put back what ``redact_url`` took out, from the run's first request."""
    target = httpx.URL(url)
    secret = {
        name: first.params[name]
        for name, value in target.params.multi_items()
        if value == REDACTED and name in first.params
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
