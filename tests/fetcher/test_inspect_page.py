"""One decode per page: ``inspect_page`` reads a page's pagination fields, rows and cursor in
one pass over its bytes, without building its records, and the fetcher runs it in a worker
thread when the page is large."""

from __future__ import annotations

import threading
from typing import Any

import msgspec
import pytest

from daemon import records
from daemon.app import open_daemon
from daemon.fetcher import _progress
from daemon.fetcher._progress import Progress
from daemon.fetcher._send import Fetched
from daemon.jsonpath import PageFields
from daemon.records import PageShape, inspect_page
from daemon.settings import Pagination, SourceConfig
from tests._collect import run, source
from tests.fix_daemon import MakeSettings, Requester
from tests.fix_http import LocalAPI

#: A number no Python float holds: ``msgspec.json.decode`` refuses to build it.
UNBUILDABLE = "1e400"


def record(i: int, pad: int = 0) -> bytes:
    at = f"2026-01-{1 + i % 28:02d}"
    return f'{{"id": {i}, "at": "{at}", "big": {UNBUILDABLE}, "pad": "{"x" * pad}"}}'.encode()


def page_of(n: int, *, pad: int = 0) -> bytes:
    records = b", ".join(record(i, pad) for i in range(n))
    return b'{"meta": {"next": "c2", "more": true}, "items": [' + records + b"]}"


def test_records_are_counted_and_their_cursor_read_without_building_them() -> None:
    page = page_of(5)
    with pytest.raises(msgspec.ValidationError, match="Number out of range"):
        msgspec.json.decode(page)  # building a record fails: inspect_page must not build one
    pagination = Pagination(kind="cursor", cursor_path="meta.next", has_more_path="meta.more")
    shape = PageShape(
        granularity="record", records_path="items", pagination=pagination, cursor_field="at"
    )
    facts = inspect_page(shape, "application/json", page)
    assert facts.rows == 5
    assert facts.cursor_values == [f"2026-01-{1 + i:02d}" for i in range(5)]
    assert isinstance(facts.fields, PageFields)
    assert facts.fields.values["meta.next"] == "c2"
    assert facts.fields.values["meta.more"] is True
    # The records are the page's own bytes (msgspec.Raw slices), never decoded values.
    assert [bytes(r) for r in facts.fields.values["items"]] == [record(i) for i in range(5)]


def test_the_page_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One msgspec pass over the page; per record, only the cursor field is decoded."""
    page = page_of(50)
    passes: list[int] = []
    per_record: list[int] = []
    real_locator, real_field = records._locator, records._field_decoder

    def locator(*paths: Any) -> Any:
        locate = real_locator(*paths)

        def counted(body: bytes) -> Any:
            passes.append(len(body))
            return locate(body)

        return counted

    def field_decoder(field: str) -> Any:
        decode = real_field(field)

        def counted(record: Any) -> Any:
            per_record.append(len(record))
            return decode(record)

        return counted

    monkeypatch.setattr(records, "_locator", locator)
    monkeypatch.setattr(records, "_field_decoder", field_decoder)
    pagination = Pagination(kind="page", records_path="items", has_more_path="meta.more")
    shape = PageShape(
        granularity="record", records_path="items", pagination=pagination, cursor_field="id"
    )
    facts = inspect_page(shape, "application/json", page)
    assert (facts.rows, facts.cursor_values) == (50, list(range(50)))
    assert passes == [len(page)]
    assert len(per_record) == 50
    assert sum(per_record) < len(page)  # each record's bytes, never the page again


def fetched(body: bytes) -> Fetched:
    return Fetched(
        status_code=200,
        headers={"content-type": "application/json"},
        content_type="application/json",
        body=body,
        elapsed_ms=1.0,
        url="http://api.test/items",
    )


def config(**extra: Any) -> SourceConfig:
    return msgspec.convert(
        {"name": "s", "url": "http://api.test/items", "schedule": "0 0 * * *", **extra},
        SourceConfig,
    )


@pytest.mark.anyio
async def test_progress_decodes_a_large_page_in_a_worker_thread_and_a_small_one_inline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, str]] = []
    real = records.inspect_page

    def inspect(shape: PageShape, content_type: str | None, body: bytes) -> Any:
        calls.append((len(body), threading.current_thread().name))
        return real(shape, content_type, body)

    monkeypatch.setattr(records, "inspect_page", inspect)
    src = config(
        records_path="items",
        granularity="record",
        pagination={"kind": "page", "has_more_path": "meta.more"},
        incremental={"field": "at", "param": "since"},
    )
    small, large = page_of(3), page_of(40, pad=10_000)
    assert len(small) < _progress._INLINE_DECODE_BYTES < len(large)
    progress = Progress()
    small_facts = await progress.add(src, fetched(small))
    large_facts = await progress.add(src, fetched(large))
    main = threading.current_thread().name
    assert calls[0] == (len(small), main)
    assert calls[1][0] == len(large)
    assert calls[1][1] != main
    assert len(calls) == 2  # once per page
    assert (small_facts.rows, large_facts.rows, progress.run_rows) == (3, 40, 43)
    assert progress.cursor == "2026-01-28"
    assert isinstance(large_facts.fields, PageFields)
    assert large_facts.fields.values["meta.more"] is True


@pytest.mark.anyio
async def test_a_page_stored_whole_of_a_plain_source_is_not_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(records, "inspect_page", None)  # calling it would fail
    progress = Progress()
    facts = await progress.add(config(), fetched(page_of(3)))
    assert (facts.rows, facts.fields, progress.run_rows) == (1, None, 1)


@pytest.mark.anyio
async def test_each_page_of_a_run_is_inspected_once(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inspected: list[int] = []
    real = records.inspect_page

    def inspect(shape: PageShape, content_type: str | None, body: bytes) -> Any:
        inspected.append(len(body))
        return real(shape, content_type, body)

    monkeypatch.setattr(records, "inspect_page", inspect)
    large = page_of(40, pad=10_000)
    api.route("/items", body=page_of(2), content_type="application/json", times=1)
    api.route("/items", body=large, content_type="application/json", times=1)
    api.route("/items", json={"items": []})
    paged = source(
        api,
        "paged",
        "/items",
        records_path="items",
        granularity="record",
        pagination={"kind": "page"},
    )
    async with open_daemon(make_settings([paged])):
        done = await run(request_reply, db_conn, "paged")
    assert (done["status"], done["pages"], done["rows"]) == ("stored", 3, 42)
    assert inspected == [len(page_of(2)), len(large), len(b'{"items": []}')]
