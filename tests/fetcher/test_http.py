"""The HTTP edge: retry predicate, Retry-After, request building, and send()."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from daemon import __version__
from daemon.errors import FetchPermanent, FetchTransient
from daemon.fetcher._client import RETRY_AFTER_CAP_S, open_client, parse_retry_after
from daemon.fetcher._request import build_request, next_request
from daemon.fetcher._send import is_retryable_status, send
from daemon.settings import SourceConfig
from tests._collect import window

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
SECRET_URL = "https://api.example/v1/rates?api_key=SECRET&day=1"
SAFE_URL = "https://api.example/v1/rates?api_key=REDACTED&day=1"

Handler = Callable[[httpx.Request], httpx.Response]


def source_config(**overrides: Any) -> SourceConfig:
    fields: dict[str, Any] = {
        "name": "rates",
        "url": "https://api.example/v1/rates",
        "schedule": "0 7 * * *",
    }
    return SourceConfig(**(fields | overrides))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The shared client the daemon uses (no request leaves the process in these tests)."""
    async with open_client() as shared:
        yield shared


@pytest.fixture
async def mock_api() -> AsyncIterator[Callable[[Handler], httpx.AsyncClient]]:
    """Clients whose transport is a handler function; all closed at the end."""
    clients: list[httpx.AsyncClient] = []

    def make(handler: Handler) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def send_to(
    make: Callable[[Handler], httpx.AsyncClient],
    handler: Handler,
    *,
    url: str = SECRET_URL,
    max_bytes: int = 1024,
) -> Any:
    client = make(handler)
    return await send(client, client.build_request("GET", url), source="rates", max_bytes=max_bytes)


# -- retry predicate and Retry-After


@pytest.mark.parametrize(("status", "retry"), [(429, True), (500, True), (503, True), (599, True)])
def test_retryable_statuses(status: int, retry: bool) -> None:
    assert is_retryable_status(status) is retry


@pytest.mark.parametrize("status", [200, 304, 400, 401, 404, 422, 600])
def test_non_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status) is False


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 5 ", 5.0),
        ("99999", RETRY_AFTER_CAP_S),
        ("Thu, 01 Jan 2026 12:01:00 GMT", 60.0),
        ("Thu, 01 Jan 2026 11:00:00 GMT", 0.0),
        ("Fri, 02 Jan 2026 12:00:00 GMT", RETRY_AFTER_CAP_S),
        ("soon", None),
        ("²", None),
        ("١٢", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_retry_after_cap_is_fifteen_minutes() -> None:
    assert RETRY_AFTER_CAP_S == 900.0


# -- building the request


@pytest.mark.anyio
async def test_params_merge_into_the_url_query(client: httpx.AsyncClient) -> None:
    source = source_config(
        url="https://api.example/v1/{scheduled_for:%Y-%m-%d}?fixed=1&format=json",
        params={"since": "{interval_start:%Y-%m-%d}", "source": "{source}"},
    )

    request = build_request(client, source, window("Europe/Berlin"))

    assert str(request.url) == (
        "https://api.example/v1/2026-03-15?fixed=1&format=json&since=2026-03-14&source=rates"
    )
    assert request.method == "GET"
    assert request.content == b""


@pytest.mark.anyio
async def test_dict_body_is_json(client: httpx.AsyncClient) -> None:
    source = source_config(
        method="POST",
        headers={"X-Client": "coleta"},
        body={"day": "{scheduled_for:%d}", "ids": ["{source}", 7], "nested": {"ok": True}},
    )

    request = build_request(client, source, window("Europe/Berlin"))

    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["X-Client"] == "coleta"
    assert json.loads(request.content) == {"day": "15", "ids": ["rates", 7], "nested": {"ok": True}}


@pytest.mark.anyio
async def test_dict_body_keeps_an_explicit_content_type(client: httpx.AsyncClient) -> None:
    source = source_config(
        method="POST", headers={"Content-Type": "application/vnd.api+json"}, body={"a": 1}
    )

    request = build_request(client, source, window("Europe/Berlin"))

    assert request.headers.get_list("Content-Type") == ["application/vnd.api+json"]


@pytest.mark.anyio
async def test_string_body_is_sent_as_is(client: httpx.AsyncClient) -> None:
    source = source_config(method="PUT", body="day={scheduled_for:%Y-%m-%d}&raw={{x}}")

    request = build_request(client, source, window("Europe/Berlin"))

    assert request.content == b"day=2026-03-15&raw={x}"
    assert "Content-Type" not in request.headers


@pytest.mark.anyio
async def test_request_carries_timeout_and_user_agent(client: httpx.AsyncClient) -> None:
    request = build_request(
        client, source_config(timeout_s=12.5, connect_timeout_s=3.0), window("Europe/Berlin")
    )

    assert request.headers["User-Agent"] == f"coleta/{__version__}"
    assert request.extensions["timeout"] == {
        "connect": 3.0,
        "read": 12.5,
        "write": 12.5,
        "pool": 12.5,
    }


# -- send() against a mock transport


@pytest.mark.anyio
async def test_ok_response_is_fetched(mock_api: Callable[[Handler], httpx.AsyncClient]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"EUR": 1}, headers={"Set-Cookie": "session=s3cr3t"})

    fetched = await send_to(mock_api, handler)

    assert fetched.status_code == 200
    assert fetched.body == b'{"EUR":1}'
    assert fetched.content_type == "application/json"
    assert fetched.headers["set-cookie"] == "REDACTED"
    assert fetched.url == SAFE_URL
    assert fetched.elapsed_ms >= 0


@pytest.mark.anyio
async def test_503_with_retry_after_is_transient(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": "7"}, text="busy")

    with pytest.raises(FetchTransient) as exc_info:
        await send_to(mock_api, handler)

    error = exc_info.value
    assert str(error) == f"HTTP 503 Service Unavailable from {SAFE_URL}: busy"
    assert (error.code, error.status, error.retry_after_s) == ("http_status", 503, 7.0)
    assert (error.source, error.url) == ("rates", SAFE_URL)


@pytest.mark.anyio
async def test_429_without_retry_after_is_transient(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    with pytest.raises(FetchTransient) as exc_info:
        await send_to(mock_api, lambda request: httpx.Response(429))

    error = exc_info.value
    assert str(error) == f"HTTP 429 Too Many Requests from {SAFE_URL}"
    assert (error.code, error.status, error.retry_after_s) == ("http_status", 429, None)


@pytest.mark.anyio
async def test_404_is_permanent(mock_api: Callable[[Handler], httpx.AsyncClient]) -> None:
    with pytest.raises(FetchPermanent) as exc_info:
        await send_to(mock_api, lambda request: httpx.Response(404, text="no such day"))

    error = exc_info.value
    assert str(error) == f"HTTP 404 Not Found from {SAFE_URL}: no such day"
    assert (error.code, error.status, error.url) == ("http_status", 404, SAFE_URL)


@pytest.mark.anyio
async def test_body_over_the_limit_is_permanent(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    with pytest.raises(FetchPermanent) as exc_info:
        await send_to(
            mock_api, lambda request: httpx.Response(200, content=b"x" * 11), max_bytes=10
        )

    error = exc_info.value
    assert str(error) == f"response from {SAFE_URL} is larger than 10 bytes"
    assert (error.code, error.status) == ("response_too_large", 200)


@pytest.mark.anyio
async def test_body_at_the_limit_is_fetched(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    fetched = await send_to(
        mock_api, lambda request: httpx.Response(200, content=b"x" * 10), max_bytes=10
    )

    assert fetched.body == b"x" * 10


@pytest.mark.anyio
async def test_connect_error_is_transient(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("All connection attempts failed", request=request)

    with pytest.raises(FetchTransient) as exc_info:
        await send_to(mock_api, handler)

    error = exc_info.value
    assert str(error) == f"ConnectError for {SAFE_URL}: All connection attempts failed"
    assert (error.code, error.status, error.url) == ("connect", None, SAFE_URL)
    assert isinstance(error.__cause__, httpx.ConnectError)


@pytest.mark.anyio
async def test_timeout_is_transient(mock_api: Callable[[Handler], httpx.AsyncClient]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(FetchTransient) as exc_info:
        await send_to(mock_api, handler)

    error = exc_info.value
    assert str(error).startswith("ReadTimeout after ")
    assert str(error).endswith(f" s from {SAFE_URL}")
    assert (error.code, error.status, error.url) == ("timeout", None, SAFE_URL)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(lambda request: httpx.Response(200, text="ok"), id="200"),
        pytest.param(lambda request: httpx.Response(404), id="404"),
        pytest.param(lambda request: httpx.Response(503), id="503"),
        pytest.param(lambda request: httpx.Response(200, content=b"x" * 2048), id="too-large"),
    ],
)
async def test_secret_query_never_shown(
    mock_api: Callable[[Handler], httpx.AsyncClient], handler: Handler
) -> None:
    try:
        fetched = await send_to(mock_api, handler)
    except (FetchTransient, FetchPermanent) as exc:
        seen = [str(exc), exc.url]
    else:
        seen = [fetched.url]

    assert all("SECRET" not in text for text in seen), seen
    assert SAFE_URL in seen


@pytest.mark.anyio
async def test_sent_request_is_what_build_request_made(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    client = mock_api(handler)
    source = source_config(method="POST", url="https://api.example/q?a=1", body={"d": "{source}"})
    fetched = await send(
        client, build_request(client, source, window("Europe/Berlin")), source="rates", max_bytes=1
    )

    (request,) = seen
    assert (request.method, str(request.url), request.content) == (
        "POST",
        "https://api.example/q?a=1",
        b'{"d":"rates"}',
    )
    assert (fetched.status_code, fetched.body, fetched.content_type) == (204, b"", None)


@pytest.mark.anyio
async def test_an_error_body_echoing_the_url_does_not_leak_the_key(
    mock_api: Callable[[Handler], httpx.AsyncClient],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, text=f"bad key in {request.url}")

    with pytest.raises(FetchPermanent) as exc_info:
        await send_to(mock_api, handler)
    assert "bad key in" in str(exc_info.value)
    assert "SECRET" not in str(exc_info.value)


@pytest.mark.anyio
async def test_a_lowercase_content_type_header_is_not_doubled(client: httpx.AsyncClient) -> None:
    source = source_config(
        method="POST",
        headers={"content-type": "application/vnd.api+json"},
        body={"q": "x"},
    )
    request = build_request(client, source, window("Europe/Berlin"))
    assert request.headers.get_list("content-type") == ["application/vnd.api+json"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "later", ["https://api.example/q?a=1&page=2", "https://other.example:8443/next?c=%20x"]
)
@pytest.mark.parametrize("host", [{}, {"Host": "api.internal"}])
async def test_a_later_page_is_requested_as_build_request_would(
    client: httpx.AsyncClient, later: str, host: dict[str, str]
) -> None:
    source = source_config(
        method="POST",
        url="https://api.example/q?a=1",
        headers={"X-Key": "k", "Accept": "application/json", **host},
        body={"d": "{source}"},
        rate_limit="5/s",
        timeout_s=7,
    )
    first = build_request(client, source, window("Europe/Berlin"))
    built = build_request(client, source, window("Europe/Berlin"), url=later)
    made = next_request(first, later, source=source)

    def shape(request: httpx.Request) -> tuple[Any, ...]:
        return (
            request.method,
            str(request.url),
            sorted(request.headers.multi_items()),
            request.content,
            request.extensions,
        )

    assert shape(made) == shape(built)
    assert made.headers["host"] == host.get("Host", httpx.URL(later).netloc.decode())
