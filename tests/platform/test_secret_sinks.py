"""Every place text leaves the daemon, searched for every secret it holds, in every form.

A daemon (a child process, logging JSON at DEBUG, exporting spans and metrics to a real OTLP
receiver) collects from a local API with six kinds of secret: a query parameter whose name says
nothing (``appid``), a header whose name says nothing (``X-Tenant``), a bearer token, an API key
sent as the parameter ``k``, HTTP Basic, and OAuth 2 client credentials whose token endpoint
answers a distinctive access token. The API echoes what it was sent — the request URL and the
credential headers — in its error bodies, in a redirect and in the headers of a good answer, and
one paginated run waits for a retry with its next page's URL in the progress bucket.

Then every sink is searched for each secret as is, URL-encoded (``quote``/``quote_plus``, hex in
upper and lower case), JSON-escaped, as the base64 of HTTP Basic and as ``Bearer <token>``: the
log lines, the spans and metrics received, every column of every table of the schema, every
message of every stream and bucket of the bus prefix (with the bytes they carry as base64
decoded), the service's replies and the CLI's output.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, unquote_plus, urlsplit

import anyio
import msgspec
import nats
import nats.js.errors
import pytest
from google.protobuf.json_format import MessageToDict
from psycopg import sql

from contracts import DeadLetter, RawPayload, RunEvent, Subjects
from daemon.app import open_daemon
from daemon.settings import load_settings
from tests._collect import run
from tests.fix_daemon import Requester
from tests.fix_faults import DaemonFactory, connect_db, eventually, request, request_json
from tests.fix_http import LocalAPI
from tests.fix_otlp import Received

pytestmark = pytest.mark.anyio

APPID = "Zq8+w/9 x~y!appid"  # reserved characters: its encoded forms differ from it
TENANT = 'tenant-"Hx4r8Kw2'  # a quote: its JSON-escaped form differs from it
BEARER = "bearer-Mv7q2Lp9"
API_KEY = "apikey-Rt5w3Nz8"
BASIC_USER, BASIC_PASSWORD = "collector", "basic-Pw6y1Qs4"
CLIENT_ID, CLIENT_SECRET = "client-7", "oauth-Cs3j8Vb5"
ACCESS_TOKEN = "access-Tk9e2Wx7-distinct"

SECRET_ENV = {
    "COLETA_SECRET_APPID": APPID,
    "COLETA_SECRET_TENANT": TENANT,
    "COLETA_SECRET_BEARER": BEARER,
    "COLETA_SECRET_API_KEY": API_KEY,
    "COLETA_SECRET_BASIC": BASIC_PASSWORD,
    "COLETA_SECRET_CLIENT": CLIENT_SECRET,
}


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode().rstrip("=")


def _forms(value: str) -> dict[str, str]:
    """``value`` as it may travel: as is, URL-encoded, JSON-escaped."""
    forms = {"raw": value, "json": json.dumps(value)[1:-1]}
    for name, encoded in (
        ("quote", quote(value, safe="")),
        ("quote/", quote(value)),
        ("quote_plus", quote_plus(value)),
    ):
        forms[name] = encoded
        forms[name + " lower-hex"] = _lower_hex(encoded)
    unique: dict[str, str] = {}
    for name, text in forms.items():
        if text not in unique.values():
            unique[name] = text
    return unique


def _lower_hex(text: str) -> str:
    head, *rest = text.split("%")
    return "%".join([head, *(part[:2].lower() + part[2:] for part in rest)])


#: Every form of every secret, by a name saying which it is.
FORBIDDEN = {
    f"{name} {form}": text
    for name, value in {
        "appid": APPID,
        "tenant": TENANT,
        "bearer": BEARER,
        "api_key": API_KEY,
        "basic password": BASIC_PASSWORD,
        "client secret": CLIENT_SECRET,
        "access token": ACCESS_TOKEN,
    }.items()
    for form, text in _forms(value).items()
} | {
    "basic base64": _b64(f"{BASIC_USER}:{BASIC_PASSWORD}"),
    "client base64": _b64(f"{CLIENT_ID}:{CLIENT_SECRET}"),
    "Bearer access token": f"Bearer {ACCESS_TOKEN}",
    "Bearer token": f"Bearer {BEARER}",
}


class Leaks:
    """What each sink holds of the forbidden texts."""

    def report(self) -> str:
        return "\n".join(
            f"  {sink}: {', '.join(sorted(names))}" for sink, names in self.found.items()
        )

    def __init__(self) -> None:
        self.found: dict[str, set[str]] = {}
        self.searched: dict[str, int] = {}
        #: Per sink, how many of its texts hold ``REDACTED``.
        self.masked: dict[str, int] = {}

    def search(self, sink: str, texts: list[str]) -> None:
        """Look for every form in ``texts``, and in the strings of those that are JSON (a log
        line, a reply), where JSON-escaping would hide a form from the search."""
        texts = texts + [inner for text in texts for inner in _strings(text)]
        self.searched[sink] = self.searched.get(sink, 0) + len(texts)
        self.masked[sink] = self.masked.get(sink, 0) + sum("REDACTED" in text for text in texts)
        for text in texts:
            for name, form in FORBIDDEN.items():
                if form in text:
                    self.found.setdefault(sink, set()).add(name)


def _strings(text: str) -> list[str]:
    """The strings inside ``text`` when it is a JSON document (else none), at any depth."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
        elif isinstance(item, list):
            stack.extend(item)
    return found


# -- the API the secrets go to ---------------------------------------------------------------


class EchoAPI:
    """Checks nothing, answers by path, and echoes what it was sent.

    ``/token`` is the OAuth token endpoint; ``/data`` answers 200 with the request URL and
    credential headers echoed in response headers; ``/redirect`` sends to ``/fail`` with the
    request URL in the ``Location``; ``/fail`` answers 400 echoing URL and headers in its body;
    ``/badredirect`` redirects to an ``ftp://`` URL (refused) holding the query; ``/pages``
    serves page 1 with a ``Link`` to page 2, which answers 503 with a long ``Retry-After``.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                parts = urlsplit(self.path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                api.requests.append((parts.path, parse_qs(parts.query), headers))
                base = f"http://127.0.0.1:{api.port}"
                seen = {
                    "decoded": unquote_plus(self.path),
                    "authorization": headers.get("authorization", ""),
                    "tenant": headers.get("x-tenant", ""),
                    "url": base + self.path,
                }
                status, body, extra = 404, b"no such route", {}
                if parts.path == "/token":
                    status, body = 200, json.dumps({"access_token": ACCESS_TOKEN}).encode()
                elif parts.path == "/data":
                    status, body = 200, b'{"ok": true}'
                    extra = {"X-Seen-Url": seen["url"], "X-Seen-A": seen["authorization"]}
                    extra |= {"X-Seen-T": seen["tenant"], "X-Seen-D": seen["decoded"]}
                elif parts.path == "/redirect":
                    status, body = 302, b""
                    target = f"/fail?{parts.query}&from={quote(seen['url'], safe='')}"
                    extra = {"Location": target}
                elif parts.path == "/fail":
                    status, body = 400, json.dumps(seen).encode()
                elif parts.path == "/badredirect":
                    status, body = 302, b""
                    extra = {"Location": f"ftp://127.0.0.1/x?{parts.query}"}
                elif parts.path == "/pages" and "page" not in parse_qs(parts.query):
                    status, body = 200, b'[{"i": 1}]'
                    extra = {"Link": f'<{base}{self.path}&page=2>; rel="next"'}
                elif parts.path == "/pages":
                    status, body = 503, json.dumps(seen).encode()
                    extra = {"Retry-After": "900"}
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def seen(self, path: str) -> list[tuple[dict[str, list[str]], dict[str, str]]]:
        return [(query, headers) for p, query, headers in self.requests if p == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def echo_api() -> Iterator[EchoAPI]:
    api = EchoAPI()
    try:
        yield api
    finally:
        api.close()


# -- the configuration -----------------------------------------------------------------------

#: What each kind of source adds to its table: the secret, by reference.
KINDS = {
    "appid": 'params = { appid = { secret = "appid" } }',
    "tenant": 'headers = { X-Tenant = { secret = "tenant" } }',
    "bearer": 'auth = { kind = "bearer", token = { secret = "bearer" } }',
    "apikey": 'auth = { kind = "api_key", param = "k", key = { secret = "api_key" } }',
    "basic": (
        f'auth = {{ kind = "basic", username = "{BASIC_USER}", password = {{ secret = "basic" }} }}'
    ),
    "oauth": (
        'auth = { kind = "oauth2", token_url = "TOKEN_URL",'
        f' client_id = "{CLIENT_ID}", client_secret = {{ secret = "client" }} }}'
    ),
}


def config(api: EchoAPI, nats_url: str, database_url: str, prefix: str, schema: str) -> str:
    lines = [
        f'nats_url = "{nats_url}"',
        f'database_url = "{database_url}"',
        f'bus_prefix = "{prefix}"',
        f'database_schema = "{schema}"',
        "shutdown_grace_s = 3",
    ]

    def table(name: str, path: str, kind: str, *extra: str, attempts: int = 1) -> None:
        lines.extend(
            [
                "[[sources]]",
                f'name = "{name}"',
                f'url = "{api.url(path)}"',
                'schedule = "0 0 1 1 *"',
                f"retries = {{ max_attempts = {attempts} }}",
                KINDS[kind].replace("TOKEN_URL", api.url("/token")),
                *extra,
            ]
        )

    for kind in KINDS:
        table(f"{kind}-ok", "/data", kind)
        table(f"{kind}-fail", "/redirect", kind)
    table("appid-badredirect", "/badredirect", "appid")
    table("appid-pages", "/pages", "appid", 'pagination = { kind = "link" }', attempts=3)
    return "\n".join(lines) + "\n"


# -- reading every sink ----------------------------------------------------------------------


async def bus_texts(nats_url: str, prefix: str) -> dict[str, list[str]]:
    """Every message of every stream and bucket of ``prefix``: subject, headers, data, and
    the bytes JSON carries as base64 (a page's body, a dead letter's original) decoded."""
    run_event = msgspec.json.Decoder(RunEvent)
    dead_letter = msgspec.json.Decoder(DeadLetter)
    found: dict[str, list[str]] = {}
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for stream in Subjects(prefix).streams:
            texts = found.setdefault(stream, [])
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                continue
            if not info.state.messages:
                continue
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                data = msg.data or b""
                texts.append(f"{stream} {msg.subject} {msg.headers} ")
                texts.append(data.decode(errors="replace"))
                if ".dlq." in (msg.subject or ""):
                    original = dead_letter.decode(data).original
                    texts.append(original.decode(errors="replace"))
                    data = original
                if ".raw." in (msg.subject or "") or b'"kind":"page"' in data:
                    try:
                        event = run_event.decode(data)
                    except msgspec.DecodeError:
                        continue
                    if isinstance(event, RawPayload):
                        texts.append(event.body.decode(errors="replace"))
    finally:
        await nc.close()
    return found


async def database_texts(database_url: str, schema: str) -> dict[str, list[str]]:
    """Every value of every column of every table of ``schema``, as text."""
    found: dict[str, list[str]] = {}
    async with connect_db(database_url, schema) as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (schema,),
        )
        for (table,) in await cur.fetchall():
            rows = await conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
            texts = []
            for row in await rows.fetchall():
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        texts.append(bytes(value).decode(errors="replace"))
                    elif value is not None:
                        texts.append(str(value))
                        texts.append(json.dumps(value, default=str, ensure_ascii=False))
            found[table] = texts
    return found


def span_texts(received: Received) -> list[str]:
    texts = []
    for request_ in received.traces:
        texts.append(json.dumps(MessageToDict(request_), ensure_ascii=False))
        texts.append(request_.SerializeToString().decode(errors="replace"))
    return texts


def metric_texts(received: Received) -> list[str]:
    return [
        json.dumps(MessageToDict(request_), ensure_ascii=False) for request_ in received.metrics
    ]


def cli(nats_url: str, prefix: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--server", nats_url],
        env={"COLETA_BUS_PREFIX": prefix, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


# -- the test --------------------------------------------------------------------------------


async def test_no_sink_holds_a_secret_in_any_form(
    echo_api: EchoAPI,
    daemon_processes: DaemonFactory,
    otlp_http_receiver: tuple[str, Received],
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
) -> None:
    endpoint, received = otlp_http_receiver
    text = config(echo_api, nats_url, database_url, bus_prefix, db_schema)
    daemon = daemon_processes(
        "sinks",
        text,
        LOG_LEVEL="DEBUG",
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
        OTEL_BSP_SCHEDULE_DELAY="200",
        OTEL_METRIC_EXPORT_INTERVAL="500",
        **SECRET_ENV,
    )
    daemon.start()
    await daemon.wait_ready()

    async def trigger(name: str) -> str:
        reply = await request_json(nats_url, f"{bus_prefix}.trigger", {"source": name})
        return str(reply["run_id"])

    names = [f"{kind}-{outcome}" for kind in KINDS for outcome in ("ok", "fail")]
    names.append("appid-badredirect")
    run_ids = {name: await trigger(name) for name in names}

    async def outcomes() -> dict[str, str]:
        async with connect_db(database_url, db_schema) as conn:
            cur = await conn.execute(
                "SELECT run_id, status FROM collection_runs WHERE status IN ('stored', 'failed')"
            )
            return {str(run_id): str(status) for run_id, status in await cur.fetchall()}

    done = await eventually(
        outcomes, until=lambda found: set(run_ids.values()) <= found.keys(), what="every run"
    )
    assert {name: done[run_id] for name, run_id in run_ids.items()} == {
        name: "stored" if name.endswith("-ok") else "failed" for name in names
    }
    # Last, as its 503 asks the host to wait 15 minutes: the run waits for its retry, with
    # its next page's URL in the progress bucket.
    await trigger("appid-pages")
    progress_stream = f"KV_{Subjects(bus_prefix).progress_bucket}"

    async def progress_mark() -> bytes:
        """The paginated run's last progress mark: where its retry will start."""
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(progress_stream)
            if not info.state.messages:
                return b""
            return (await js.get_msg(progress_stream, info.state.last_seq)).data or b""
        finally:
            await nc.close()

    await eventually(progress_mark, until=lambda mark: b'"page":1' in mark, what="a mark at page 2")

    # The secrets did reach the API, each where it belongs (else this proves nothing).
    (data_query, _), *_ = echo_api.seen("/data")
    assert data_query["appid"] == [APPID]
    headers_seen = [headers for _, headers in echo_api.seen("/data")]
    assert {"x-tenant": TENANT}.items() <= next(h for h in headers_seen if "x-tenant" in h).items()
    authorizations = {h.get("authorization") for h in headers_seen}
    assert f"Bearer {BEARER}" in authorizations
    assert f"Bearer {ACCESS_TOKEN}" in authorizations
    assert "Basic " + base64.b64encode(f"{BASIC_USER}:{BASIC_PASSWORD}".encode()).decode() in (
        authorizations
    )
    assert any(query.get("k") == [API_KEY] for query, _ in echo_api.seen("/data"))
    client_basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert {headers["authorization"] for _, headers in echo_api.seen("/token")} == {
        f"Basic {client_basic}"
    }
    # Pagination still follows a Link that holds the secret: page 2 was asked with it.
    (page2,) = [query for query, _ in echo_api.seen("/pages") if "page" in query]
    assert page2["appid"] == [APPID]

    leaks = Leaks()
    for stream, texts in (await bus_texts(nats_url, bus_prefix)).items():
        leaks.search(f"stream {stream}", texts)
    for table, texts in (await database_texts(database_url, db_schema)).items():
        leaks.search(f"table {table}", texts)
    replies = []
    for endpoint_name, body in (
        ("status", {}),
        ("runs", {"limit": 100}),
        ("health", {}),
    ):
        reply = await request(nats_url, f"{bus_prefix}.{endpoint_name}", body)
        replies += [str(reply.headers), reply.data.decode(errors="replace")]
    for srv in ("$SRV.INFO", "$SRV.STATS"):
        reply = await request(nats_url, f"{srv}.{bus_prefix}")
        replies.append(reply.data.decode(errors="replace"))
    leaks.search("service replies", replies)
    outputs = [
        await anyio.to_thread.run_sync(cli, nats_url, bus_prefix, *args)
        for args in (("status", "--json"), ("runs", "--json", "-n", "100"), ("runs",), ("health",))
    ]
    leaks.search("CLI output", outputs)

    assert daemon.kill(signal.SIGTERM) == 0
    lines = daemon.tail(lines=100_000).splitlines()
    assert any('"event":"fetch.failed"' in line for line in lines)
    leaks.search("log lines", lines)
    leaks.search("spans", span_texts(received))
    leaks.search("metrics", metric_texts(received))

    assert not leaks.found, "secrets leaked:\n" + leaks.report()
    # Every sink was searched with something in it: the echoes were kept, masked.
    masked = {sink for sink, count in leaks.masked.items() if count}
    assert {
        "table collection_runs",
        f"stream {Subjects(bus_prefix).raw_stream}",
        f"stream {Subjects(bus_prefix).dlq_stream}",
        f"stream KV_{Subjects(bus_prefix).progress_bucket}",
        "service replies",
        "CLI output",
        "log lines",
        "spans",
    } <= masked, leaks.masked
    assert leaks.searched[f"stream {Subjects(bus_prefix).raw_stream}"] > 40


async def test_a_run_resumes_with_the_secret_its_progress_holds_masked(
    api: LocalAPI,
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    bus_prefix: str,
    db_schema: str,
    db_conn: Any,
    request_reply: Requester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A parameter that is a secret by value only is masked in the progress bucket, and the
    retry still sends it: it is restored from the run's first request."""
    api.route("/items", json={"items": [1]}, times=1)
    api.route("/items", status=503, body="busy", times=1)
    api.route("/items", json={"items": []})
    path = tmp_path / "coleta.toml"
    path.write_text(
        f'nats_url = "{nats_url}"\ndatabase_url = "{database_url}"\n'
        f'bus_prefix = "{bus_prefix}"\ndatabase_schema = "{db_schema}"\n'
        f"""
[[sources]]
name = "paged"
url = "{api.url("/items")}"
schedule = "0 0 1 1 *"
params = {{ appid = {{ secret = "appid" }} }}
pagination = {{ kind = "page" }}
records_path = "items"
retries = {{ max_attempts = 3, max_backoff_s = 0.2 }}
"""
    )
    monkeypatch.setenv("COLETA_SECRET_APPID", APPID)
    marks: list[bytes] = []
    async with open_daemon(load_settings(path)) as daemon:
        original = daemon.bus.kv_put

        async def kv_put(kv: Any, key: str, value: bytes) -> None:
            marks.append(value)
            await original(kv, key, value)

        daemon.bus.kv_put = kv_put  # type: ignore[method-assign]  # a spy: marks are deleted
        done = await run(request_reply, db_conn, "paged")
    assert done["status"] == "stored"
    assert [hit.query.get("page", ["-"])[0] for hit in api.hits("/items")] == ["1", "2", "2"]
    assert [hit.query["appid"] for hit in api.hits("/items")] == [[APPID]] * 3
    (mark,) = marks
    assert b"appid=REDACTED&page=2" in mark
    assert not [name for name, form in FORBIDDEN.items() if form.encode() in mark]
