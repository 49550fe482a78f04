"""HTTP/1.1 transports for the load generator: POST a prepared body, get (status, body, headers).

`raw` is a small keep-alive client on asyncio streams. It exists because httpx, measured on
this 2-core machine, spends about 4 ms of CPU per request (the do-nothing server spends under
1 ms), enough to steal a real share of the CPU the servers under test need; the raw client
spends a fraction of that (the `loadgen` section shows both). `httpx` stays selectable
(`GRAFT_BENCH_HTTP_CLIENT=httpx`) to cross-check that both clients give the same figures.
"""

import asyncio
from collections.abc import Mapping
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

import httpx

REQUEST_TIMEOUT_S = 60.0


class Answer(NamedTuple):
    status: int
    body: bytes
    headers: Mapping[str, str]  # names in lower case


class Transport(Protocol):
    def request_bytes(
        self, path: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> object:
        """The request encoded once; `headers` are sent besides Content-Type and -Length."""
        ...

    async def post(self, prepared: object) -> Answer: ...

    async def close(self) -> None: ...


class HttpxTransport:
    def __init__(self, base_url: str, concurrency: int) -> None:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(
            base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_S
        )

    def request_bytes(
        self, path: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> object:
        return path, body, {"content-type": content_type, **(headers or {})}

    async def post(self, prepared: object) -> Answer:
        path, body, headers = prepared  # type: ignore[misc]
        response = await self._client.post(path, content=body, headers=headers)
        answer_headers = {k.lower(): v for k, v in response.headers.items()}
        return Answer(response.status_code, response.content, answer_headers)

    async def close(self) -> None:
        await self._client.aclose()


class RawTransport:
    """Keep-alive HTTP/1.1 over asyncio streams: one connection per request in flight, reused
    as soon as its answer has been read. Handles Content-Length and chunked answers."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        parts = urlsplit(base_url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def request_bytes(
        self, path: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> object:
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode("latin-1") + body

    async def post(self, prepared: object) -> Answer:
        reader, writer = self._idle_connection() or await asyncio.open_connection(
            self._host, self._port
        )
        try:
            writer.write(prepared)  # type: ignore[arg-type]
            await writer.drain()
            answer = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise
        if answer.headers.get("connection", "").lower() != "close":
            self._idle.append((reader, writer))
        else:
            writer.close()
        return answer

    def _idle_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A kept-alive connection the server has not closed meanwhile (servers close idle ones
        after their keep-alive timeout; sending on one would count as an error of the server)."""
        while self._idle:
            reader, writer = self._idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _read_response(reader: asyncio.StreamReader) -> Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in header_lines:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, body, headers)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected: the final empty line
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)


def make_transport(kind: str, base_url: str, concurrency: int) -> Transport:
    if kind == "httpx":
        return HttpxTransport(base_url, concurrency)
    if kind == "raw":
        return RawTransport(base_url, concurrency)
    raise ValueError(f"unknown HTTP client {kind!r}: use raw or httpx")
