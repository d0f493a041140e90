"""A raw asyncio TCP server on an event loop of its own, in a thread.

For the test APIs that must break HTTP itself (reset, truncate, send garbage) and answer while
the test's own loop is busy. ``stop`` closes the server and every connection and waits for the
loop to end, so no connection outlives the test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    def __init__(self, handle: Handler, *, host: str = "127.0.0.1", name: str = "raw-api") -> None:
        self.host = host
        self.port = 0
        self._handle = handle
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True, name=name)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError(f"{self._thread.name} did not start listening within 10 s")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        clients: set[asyncio.Task[None]] = set()

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            clients.add(task)
            try:
                await self._handle(reader, writer)
            finally:
                clients.discard(task)

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(client, self.host, 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            server.close()
            for task in list(clients):
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await server.wait_closed()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
