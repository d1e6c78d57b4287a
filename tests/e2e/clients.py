"""Real SSE and WebSocket clients that record what a dashboard would receive."""

from __future__ import annotations

import asyncio
import contextlib
import json
from ssl import SSLContext

import httpx
import websockets
from httpx_sse import aconnect_sse

from tests.conftest import wait_for


class StreamRecorder:
    """Shared waiting logic: events arrive in the background, tests wait for conditions."""

    def __init__(self) -> None:
        self.documents: list[dict] = []
        self.notices: list[dict] = []
        self.erasures: list[dict] = []
        self.connected = asyncio.Event()
        self.ended = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def ids(self) -> list[int]:
        return [document["id"] for document in self.documents]

    async def start(self) -> StreamRecorder:
        self._task = asyncio.create_task(self._guarded_run())
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def _guarded_run(self) -> None:
        try:
            await self._run()
        finally:
            self.connected.set()
            self.ended.set()

    async def wait_for_ids(self, expected: list[int], timeout: float = 10.0) -> None:
        try:
            await wait_for(lambda: len(self.ids) >= len(expected), timeout)
        finally:
            assert self.ids == expected

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        raise NotImplementedError


class SseClient(StreamRecorder):
    def __init__(
        self, url: str, last_event_id: int | None = None, *, verify: bool = True, **params: str
    ) -> None:
        super().__init__()
        self.url, self.params, self.verify = url, params, verify
        self.headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        self.status: int | None = None
        self.retry: int | None = None

    async def _run(self) -> None:
        timeout = httpx.Timeout(5.0, read=None)
        async with httpx.AsyncClient(timeout=timeout, verify=self.verify) as client:
            async with aconnect_sse(
                client, "GET", f"{self.url}/api/v1/stream", headers=self.headers, params=self.params
            ) as source:
                self.status = source.response.status_code
                self.connected.set()
                async for message in source.aiter_sse():
                    self.retry = message.retry or self.retry
                    if message.event == "resync":
                        self.notices.append(json.loads(message.data))
                    elif message.event == "erased":
                        self.erasures.append(json.loads(message.data))
                    elif message.data:
                        document = json.loads(message.data)
                        assert message.id == str(document["id"])
                        self.documents.append(document)


class WebSocketClient(StreamRecorder):
    def __init__(
        self,
        ws_url: str,
        last_event_id: int | None = None,
        *,
        ssl: SSLContext | None = None,
        **params: str,
    ) -> None:
        super().__init__()
        self.ssl = ssl
        query = dict(params)
        if last_event_id is not None:
            query["last_event_id"] = str(last_event_id)
        self.url = f"{ws_url}/api/v1/ws?" + str(httpx.QueryParams(query))
        self.close_code: int | None = None

    async def _run(self) -> None:
        async with websockets.connect(self.url, ssl=self.ssl) as socket:
            self.connected.set()
            try:
                async for text in socket:
                    message = json.loads(text)
                    if message.get("type") == "resync":
                        self.notices.append(message)
                    elif message.get("type") == "erased":
                        self.erasures.append(message)
                    else:
                        self.documents.append(message)
            except websockets.ConnectionClosed:
                pass  # the close code tells the test why
            finally:
                self.close_code = socket.close_code


async def post_events(url: str, *events: dict) -> list[dict]:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{url}/api/v1/events", json=list(events))
    assert response.status_code == 201, response.text
    return response.json()["events"]


def event(number: int, **fields) -> dict:
    return {
        "student_id": f"s{number % 3}",
        "event_type": "cell_executed",
        "event_id": f"e{number}",
        **fields,
    }
