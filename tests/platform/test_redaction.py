"""Secrets in a source's configuration reach the API and nothing else: no span, log line,
metric, database row or message on the bus holds them, whether the run succeeds or fails.

Below the end-to-end test, the redactor itself (``daemon.platform.redact``): each secret masked in
every form it takes on the wire, short ones by name only, tokens until replaced, and the log
formatter and span exporter passing everything through it.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import msgspec
import nats
import psycopg
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Status, StatusCode

from contracts import DeadLetter, RawPayload, RunEvent
from daemon.app import open_daemon
from daemon.platform import logs, redact, tracing
from daemon.platform.redact import redact_headers, redact_text, redact_url
from tests.fix_daemon import MakeSettings, Requester, wait_for
from tests.fix_http import LocalAPI

pytestmark = pytest.mark.anyio

PASSWORD = "s3cretpw"
QUERY_KEY = "SECRET_Q"
HEADER_TOKEN = "SECRET_H"
BODY_SECRET = "SECRET_B"
BASIC = base64.b64encode(f"user:{PASSWORD}".encode()).decode()  # what goes on the wire
SECRETS = (PASSWORD, QUERY_KEY, HEADER_TOKEN, BODY_SECRET, BASIC.rstrip("="))


@pytest.fixture
def captured(
    spans: InMemorySpanExporter, metrics_reader: InMemoryMetricReader
) -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader, io.StringIO]]:
    """Every span, metric and log line the daemon produces, at the most verbose level."""
    lines = io.StringIO()
    logs.setup_logging("DEBUG", stream=lines)
    yield spans, metrics_reader, lines
    logs._reset_for_tests()


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


async def bus_messages(nats_url: str, streams: list[str]) -> list[str]:
    """Every message kept on ``streams``: headers and body, with the bytes fields that
    JSON carries as base64 (a page's body, a dead letter's original) decoded."""
    run_event = msgspec.json.Decoder(RunEvent)
    dead_letter = msgspec.json.Decoder(DeadLetter)
    found: list[str] = []
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for stream in streams:
            info = await js.stream_info(stream)
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(stream, seq)
                data = msg.data or b""
                found.append(f"{msg.subject} {msg.headers} {data.decode(errors='replace')}")
                if ".dlq." in (msg.subject or ""):
                    found.append(dead_letter.decode(data).original.decode(errors="replace"))
                elif ".raw." in (msg.subject or ""):
                    event = run_event.decode(data)
                    if isinstance(event, RawPayload):
                        found.append(event.body.decode(errors="replace"))
    finally:
        await nc.close()
    return found


async def test_no_secret_leaves_the_request(
    api: LocalAPI,
    make_settings: MakeSettings,
    request_reply: Requester,
    db_conn: psycopg.Connection[Any],
    nats_url: str,
    captured: tuple[InMemorySpanExporter, InMemoryMetricReader, io.StringIO],
) -> None:
    spans, metrics, logs = captured
    basic_url = f"http://user:{PASSWORD}@127.0.0.1:{api.port}/basic"
    # The API echoes the URL it was called with, key and credentials included, in its error.
    api.route("/basic", json={"rates": [1, 2]}, times=1)
    api.route("/basic", status=401, body=f"bad credentials for {basic_url}?api_key={QUERY_KEY}")
    api.route("/bearer", status=403, body=f"denied: {api.url('/bearer')}?api_key={QUERY_KEY}&x=1")
    secret_request: dict[str, Any] = {
        "method": "POST",
        "params": {"api_key": QUERY_KEY},
        "headers": {"Authorization": f"Bearer {HEADER_TOKEN}"},
        "body": {"client_secret": BODY_SECRET, "q": "rates"},
        "schedule": "0 0 1 1 *",
        "retries": {"max_attempts": 1},
    }
    settings = make_settings(
        [
            {"name": "basic", "url": basic_url, **secret_request},
            {"name": "bearer", "url": api.url("/bearer"), **secret_request},
            # Nothing listens on port 1: the connection error path.
            {"name": "refused", "url": f"http://user:{PASSWORD}@127.0.0.1:1/x", **secret_request},
        ]
    )
    async with open_daemon(settings) as daemon:
        outcomes = {}
        for source in ("basic", "basic", "bearer", "refused"):
            reply = await request_reply("trigger", {"source": source})
            run_id = msgspec.json.decode(reply.data)["run_id"]

            def finished(run_id: str = run_id) -> str | None:
                row = db_conn.execute(
                    "SELECT status FROM collection_runs WHERE run_id = %s"
                    " AND status IN ('stored', 'failed')",
                    (run_id,),
                ).fetchone()
                return row[0] if row else None

            outcomes[run_id] = await wait_for(finished, what=f"the {source} run")
        subjects = daemon.bus.subjects
        # Every span is ended once the writer is done with the last run.
        await wait_for(
            lambda: sum(s.name.startswith("write ") for s in spans.get_finished_spans()) >= 2
        )

    # The secrets did reach the API (else this test would prove nothing) ...
    first, _second = api.hits("/basic")
    assert first.query == {"api_key": [QUERY_KEY]}
    assert first.headers["authorization"] == f"Basic {BASIC}"  # URL credentials win (httpx)
    assert BODY_SECRET in first.body.decode()
    (bearer,) = api.hits("/bearer")
    assert bearer.headers["authorization"] == f"Bearer {HEADER_TOKEN}"
    assert sorted(outcomes.values()) == ["failed", "failed", "failed", "stored"]

    # ... and nowhere else.
    finished_spans = spans.get_finished_spans()
    assert {"GET", "POST"} & {span.name for span in finished_spans}
    assert any(span.events for span in finished_spans)  # errors were recorded
    for span in finished_spans:
        assert not leaks(span.to_json()), span.to_json()

    lines = logs.getvalue().splitlines()
    assert any('"event":"fetch.failed"' in line for line in lines)
    assert [line for line in lines if leaks(line)] == []

    data = metrics.get_metrics_data()
    assert data is not None
    assert not leaks(data.to_json())

    runs = db_conn.execute("SELECT row_to_json(r)::text FROM collection_runs r").fetchall()
    rows = db_conn.execute("SELECT row_to_json(d)::text FROM collected_data d").fetchall()
    assert len(runs) == 4
    assert len(rows) == 1
    assert [text for (text,) in runs + rows if leaks(text)] == []
    errors = dict(
        db_conn.execute(
            "SELECT source, error FROM collection_runs WHERE error_code = 'http_status'"
        ).fetchall()
    )
    # The echo was kept, redacted: it says what went wrong without saying the secret.
    assert f"http://127.0.0.1:{api.port}/basic?api_key=REDACTED" in errors["basic"]
    assert "api_key=REDACTED&x=1" in errors["bearer"]

    messages = await bus_messages(
        nats_url, [subjects.collect_stream, subjects.raw_stream, subjects.dlq_stream]
    )
    assert sum(".dlq." in text for text in messages) >= 3
    assert [text for text in messages if leaks(text)] == []


# -- the redactor ---------------------------------------------------------------------------

#: Reserved, escaped and non-ASCII characters: every encoding changes it.
ODD = 'Zq8+w/9 x~y!"é\\appid'


@pytest.fixture
def redactor() -> Iterator[redact.Registration]:
    """A registration of this test alone (the process holds no other secret meanwhile)."""
    redact._reset_for_tests()
    with redact.registered() as registration:
        yield registration
    redact._reset_for_tests()


def _lower_hex(text: str) -> str:
    head, *rest = text.split("%")
    return "%".join([head, *(part[:2].lower() + part[2:] for part in rest)])


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(ODD, id="as is"),
        pytest.param(quote(ODD, safe=""), id="quote"),
        pytest.param(quote(ODD), id="quote, / kept"),
        pytest.param(quote_plus(ODD), id="quote_plus"),
        pytest.param(_lower_hex(quote_plus(ODD)), id="lower-case hex"),
        pytest.param(
            str(httpx.URL("http://h/", params={"a": ODD}).params).partition("=")[2],
            id="httpx query",
        ),
        pytest.param(quote(quote(ODD, safe=""), safe=""), id="encoded twice"),
        pytest.param(json.dumps(ODD)[1:-1], id="JSON, ASCII"),
        pytest.param(json.dumps(ODD, ensure_ascii=False)[1:-1], id="JSON"),
        pytest.param(json.dumps(ODD)[1:-1].replace("/", "\\/"), id="JSON, slash escaped"),
    ],
)
def test_a_secret_is_masked_in_every_form_it_takes(
    redactor: redact.Registration, form: str
) -> None:
    redactor.update([redact.Secret("sources[0].params.appid", ODD, param="appid")])
    assert redact.redact_text(f"before {form} after") == "before REDACTED after"
    assert redact.redact_url(f"http://h/p?x={form}&y=1") == "http://h/p?x=REDACTED&y=1"
    assert redact.redact_headers({"Link": f"<http://h/?q={form}>"}) == {
        "Link": "<http://h/?q=REDACTED>"
    }


def test_basic_credentials_are_masked_as_their_base64(redactor: redact.Registration) -> None:
    redactor.update([redact.Secret("auth.password", "pwd", basic_user="collector")])
    wire = base64.b64encode(b"collector:pwd").decode()
    assert wire.endswith("=")  # the padding may be cut off a text; the rest is masked
    assert redact.redact_text(f"sent Authorization: Basic {wire}") == (
        "sent Authorization: Basic REDACTED=="
    )
    # An OAuth client's credentials, form-encoded before base64 (RFC 6749 2.3.1).
    redactor.update([redact.Secret("auth.client_secret", "a b+c/d", basic_user="id:1")])
    encoded = base64.b64encode(b"id%3A1:a+b%2Bc%2Fd").decode().rstrip("=")
    assert redact.redact_text(f"Basic {encoded}") == "Basic REDACTED"


def test_a_text_cut_in_the_middle_of_a_secret_loses_its_start(
    redactor: redact.Registration,
) -> None:
    secret = "k-0123456789abcdef"
    redactor.update([redact.Secret("auth.key", secret)])
    body = f"echo: {secret} and again {secret}"[:-8]  # as _http keeps 200 bytes of a body
    assert body.endswith(secret[:10])
    assert redact.redact_text(body) == "echo: REDACTED and again REDACTED"
    # Fewer characters of it than a secret may have are left as they are.
    assert redact.redact_text("ends with k-012") == "ends with k-012"


def test_a_short_secret_is_masked_by_name_only(redactor: redact.Registration) -> None:
    short = redactor.update(
        [
            redact.Secret("sources[0].params.pin", "2024", param="pin"),
            redact.Secret("sources[0].headers.X-Tenant", "t-1", header="X-Tenant"),
            redact.Secret("sources[0].auth.key", "long-enough-key"),
        ]
    )
    assert short == ["sources[0].headers.X-Tenant", "sources[0].params.pin"]
    # Not every "2024" of every line: a run id, a date, a count stay readable.
    assert redact.redact_text("run rates@20240101 stored 2024 rows") == (
        "run rates@20240101 stored 2024 rows"
    )
    # Where coleta sends it, its name says it is a secret.
    assert redact.redact_text("GET http://h/p?pin=2024&page=2 failed") == (
        "GET http://h/p?pin=REDACTED&page=2 failed"
    )
    assert redact.redact_headers({"x-tenant": "t-1", "Accept": "t-1"}) == {
        "x-tenant": "REDACTED",
        "Accept": "t-1",
    }


def test_a_token_is_masked_until_it_is_replaced(redactor: redact.Registration) -> None:
    redact.remember(("creds", "api"), "token-one-aaaa")
    assert redact.redact_text("Bearer token-one-aaaa") == "Bearer REDACTED"
    redact.remember(("creds", "api"), "token-two-bbbb")
    assert redact.redact_text("token-one-aaaa token-two-bbbb") == "token-one-aaaa REDACTED"


def test_secrets_are_masked_while_registered_and_kept_across_updates() -> None:
    redact._reset_for_tests()
    with redact.registered([redact.Secret("a", "first-secret")]) as registration:
        registration.update([redact.Secret("b", "second-secret")])
        # A reload's secrets are added: the old one may still be valid, and still echoed.
        assert redact.redact_text("first-secret second-secret") == "REDACTED REDACTED"
        with redact.registered([redact.Secret("c", "other-daemon")]):
            assert redact.redact_text("other-daemon first-secret") == "REDACTED REDACTED"
        assert redact.redact_text("other-daemon") == "other-daemon"
    assert redact.redact_text("first-secret") == "first-secret"


def test_json_keeps_its_shape_when_masked(redactor: redact.Registration) -> None:
    redactor.update([redact.Secret("auth.key", "123456")])
    data = b'{"n":1234567,"s":"a123456b","k123456":[1,"123456"],"u":"http://u:p@h/?token=x"}'
    assert json.loads(redact.redact_json(data)) == {
        "n": 1234567,
        "s": "aREDACTEDb",
        "kREDACTED": [1, "REDACTED"],
        "u": "http://h/?token=REDACTED",
    }
    plain = b'{"a":"nothing to see"}'
    assert redact.redact_json(plain) == plain


def test_log_lines_mask_a_secret_wherever_it_is(
    redactor: redact.Registration,
) -> None:
    redactor.update([redact.Secret("sources[0].headers.X-Tenant", ODD, header="X-Tenant")])

    @dataclasses.dataclass
    class Seen:
        url: str
        tries: int

    out = io.StringIO()
    logs.setup_logging("DEBUG", stream=out)
    try:
        log = logs.get_logger("daemon.test")
        try:
            raise ValueError(f"the API said {json.dumps({'echo': ODD})}")
        except ValueError:
            log.debug(
                "event %s",
                ODD,
                exc_info=True,
                extra={
                    "nested": {"deep": [ODD, {ODD: 1}]},
                    "seen": Seen(f"http://h/?t={quote(ODD)}", 2),
                    "raw": ODD.encode(),
                    "headers": {"X-Tenant": ODD, "Accept": "text/plain"},
                },
            )
    finally:
        logs._reset_for_tests()
    (line,) = out.getvalue().splitlines()
    for form in (ODD, json.dumps(ODD)[1:-1], quote(ODD), quote_plus(ODD), "Zq8", "appid"):
        assert form not in line
    fields = json.loads(line)
    assert fields["event"] == "event REDACTED"
    assert fields["nested"] == {"deep": ["REDACTED", {"REDACTED": 1}]}
    assert fields["seen"] == {"url": "http://h/?t=REDACTED", "tries": 2}
    assert fields["headers"] == {"X-Tenant": "REDACTED", "Accept": "text/plain"}
    assert fields["error"] == 'the API said {"echo": "REDACTED"}'


def test_spans_are_masked_on_their_way_out(redactor: redact.Registration) -> None:
    redactor.update([redact.Secret("sources[0].params.appid", ODD, param="appid")])
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(tracing.redacting(exported)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("linked") as linked:
        pass
    # As a library's instrumentation would: nothing of coleta's own redaction on the way in.
    with tracer.start_as_current_span(
        f"GET {ODD}",
        attributes={"url.full": f"http://h/?appid={quote_plus(ODD)}", "list": [ODD, "ok"]},
        links=[Link(linked.get_span_context(), {"why": ODD})],
    ) as span:
        span.add_event("exception", {"exception.message": f"failed: {ODD}"})
        span.set_status(Status(StatusCode.ERROR, f"failed: {json.dumps(ODD)}"))
    for finished in exported.get_finished_spans():
        text = finished.to_json()
        for form in (ODD, json.dumps(ODD)[1:-1], quote_plus(ODD), "Zq8"):
            assert form not in text, text
    span_out = exported.get_finished_spans()[-1]
    assert span_out.name == "GET REDACTED"
    assert dict(span_out.attributes or {}) == {
        "url.full": "http://h/?appid=REDACTED",
        "list": ("REDACTED", "ok"),
    }
    assert span_out.status.description == 'failed: "REDACTED"'
    assert span_out.events[0].attributes == {"exception.message": "failed: REDACTED"}
    assert span_out.links[0].attributes == {"why": "REDACTED"}
    provider.shutdown()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The punctuation after a URL is not part of it when that is what spoils it.
        (
            "cannot reach NATS at nats://coleta:pw@127.0.0.1:9: no servers",
            "cannot reach NATS at nats://127.0.0.1:9: no servers",
        ),
        # A URL that cannot be parsed keeps its scheme and host: what was wrong stays readable.
        (
            "invalid URL 'http://[::1/page/2?key=k1': bad port",
            "invalid URL 'http://[::1/...': bad port",
        ),
        (
            "next page http://api.example:99999/p?key=k1 refused",
            "next page http://api.example/... refused",
        ),
        ("x http://user:s3cr3t y", "x http://user/... y"),
    ],
)
def test_urls_in_text_lose_their_credentials_not_their_meaning(text: str, expected: str) -> None:
    assert redact.redact_text(text) == expected


# -- the scrubbers without secrets: by name -------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://bob:s3cr3t@api.example/v1/rates?base=EUR&api_key=s3cr3t&symbols=USD,BRL",
            "https://api.example/v1/rates?base=EUR&api_key=REDACTED&symbols=USD,BRL",
        ),
        (
            "https://api.example/x?access_token=s3cr3t&page=2&APIKEY=s3cr3t&client_secret=s3cr3t",
            "https://api.example/x?access_token=REDACTED&page=2&APIKEY=REDACTED"
            "&client_secret=REDACTED",
        ),
        (
            "https://b.s3.example/o?X-Amz-Credential=s3cr3t&X-Amz-Signature=s3cr3t&X-Amz-Expires=60",
            "https://b.s3.example/o?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED"
            "&X-Amz-Expires=60",
        ),
        (
            "https://blob.example/c?sv=2020&sig=s3cr3t&author=Ana&assignee=me&keyword=sun",
            "https://blob.example/c?sv=2020&sig=REDACTED&author=Ana&assignee=me&keyword=sun",
        ),
        (
            "https://app.example/cb?state=1#access_token=s3cr3t&expires_in=3600",
            "https://app.example/cb?state=1#access_token=REDACTED&expires_in=3600",
        ),
        ("https://api.example/v1/rates?q=a%20b&flag", "https://api.example/v1/rates?q=a%20b&flag"),
        ("http://[::1", "REDACTED"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "s3cr3t" not in redact_url(url)


def test_redact_headers() -> None:
    headers = {
        "Authorization": "Bearer s3cr3t",
        "proxy-authorization": "Basic s3cr3t",
        "Cookie": "sid=s3cr3t",
        "Set-Cookie": "sid=s3cr3t",
        "X-Api-Key": "s3cr3t",
        "X-Auth-Token": "s3cr3t",
        "X-Client-Secret": "s3cr3t",
        "X-Hub-Signature": "s3cr3t",
        "Accept": "application/json",
        "User-Agent": "coleta/0.1",
        "Nats-Msg-Id": "rates:2024",
    }
    redacted = redact_headers(headers)
    assert "s3cr3t" not in repr(redacted)
    assert list(redacted) == list(headers)
    assert redacted["Authorization"] == "REDACTED"
    assert redacted["Accept"] == "application/json"
    assert redacted["User-Agent"] == "coleta/0.1"
    assert redacted["Nats-Msg-Id"] == "rates:2024"
    assert headers["Authorization"] == "Bearer s3cr3t"  # the input is not modified


def test_redact_text_scrubs_embedded_urls() -> None:
    text = "Client error '401' for url 'https://u:s3cr3t@h.example/p?token=s3cr3t&q=1'\nretry"
    assert (
        redact_text(text)
        == "Client error '401' for url 'https://h.example/p?token=REDACTED&q=1'\nretry"
    )
    assert redact_text("no url here, token=abc") == "no url here, token=abc"
