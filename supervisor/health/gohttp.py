"""A minimal HTTP/1.1 GET client on asyncio streams, with keep-alive.

Hand-written because scraping hundreds of programs must not need a thread
pool, and the answers read are simple: a Content-Length, chunked, or the
body read to EOF, cut at a size limit. `HttpClient` keeps one connection to
one host:port alive between requests; `http_get` uses a connection of its
own. Every failure is a `ScrapeError` naming the URL and the problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024  # a metrics endpoint sends a few hundred bytes of headers


class ScrapeError(Exception):
    """An endpoint could not be read (or, raised by goruntime, answered no Go metrics)."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    truncated: bool  # the body was longer than max_bytes; the rest was not read


class HttpClient:
    """GETs from one host:port over one kept-alive HTTP/1.1 connection.

    Scraping a program every few seconds over a fresh connection costs a
    connect (and a TIME_WAIT socket) per sample: more CPU than the whole
    psutil side. The connection is opened again when the server closed it
    (a restart, an idle timeout), once per request at most.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.base, self.netloc = f"{parts.scheme}://{parts.netloc}", parts.netloc
        self.host, self.https = parts.hostname or "", parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._closing: list[asyncio.StreamWriter] = []

    async def get(self, target: str, timeout: float, max_bytes: int, keep: bool = True) -> Response:
        """GET ``target`` (path and query); ScrapeError naming the problem."""
        url = self.base + target
        try:
            async with asyncio.timeout(timeout):
                return await self._get(target, max_bytes, keep)
        except TimeoutError:
            self.close()
            raise ScrapeError(f"{url}: no answer within {timeout:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise ScrapeError(f"{url}: {exc.strerror or exc}") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise ScrapeError(f"{url}: not an HTTP answer ({exc})") from None

    async def _get(self, target: str, max_bytes: int, keep: bool) -> Response:
        close = "" if keep else "Connection: close\r\n"
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {self.netloc}\r\nUser-Agent: gosup\r\n"
            f"Accept: */*\r\n{close}\r\n"
        ).encode()
        reused = self._conn is not None
        try:
            response, reusable = await self._exchange(request, max_bytes)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
            self.close()  # the server closed our idle connection: once more, afresh
            response, reusable = await self._exchange(request, max_bytes)
        if not (keep and reusable):
            self.close()
        return response

    async def _exchange(self, request: bytes, max_bytes: int) -> tuple[Response, bool]:
        if self._conn is None:
            ctx = ssl.create_default_context() if self.https else None
            self._conn = await asyncio.open_connection(self.host, self.port, ssl=ctx)
        reader, writer = self._conn
        writer.write(request)
        await writer.drain()
        return await _read_response(reader, max_bytes)

    def close(self) -> None:
        """Close the connection (its socket goes at the loop's next turn)."""
        if self._conn is not None:
            self._conn[1].close()
            self._closing.append(self._conn[1])
            self._conn = None

    async def aclose(self) -> None:
        """Close the connection and wait until every socket it had is closed."""
        self.close()
        closing, self._closing = self._closing, []
        for writer in closing:
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def http_get(url: str, timeout: float, max_bytes: int) -> Response:
    """GET ``url`` on a connection of its own; ScrapeError naming the problem."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    client = HttpClient(url)
    try:
        return await client.get(target, timeout, max_bytes, keep=False)
    finally:
        await client.aclose()


async def _read_response(reader: asyncio.StreamReader, max_bytes: int) -> tuple[Response, bool]:
    """The response, and whether the connection may carry another request."""
    status_line = await reader.readline()
    if not status_line:
        raise asyncio.IncompleteReadError(b"", None)  # closed before answering
    match = re.match(rb"HTTP/1\.([01]) (\d{3})", status_line)
    if match is None:
        raise ValueError(f"bad status line {status_line[:60]!r}")
    headers: dict[str, str] = {}
    size = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n"):
        if not line:
            raise ValueError("connection closed in the headers")
        size += len(line)
        if size > MAX_HEADER_BYTES:  # max_bytes bounds the body; this, the rest
            raise ValueError(f"headers longer than {MAX_HEADER_BYTES} bytes")
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    framed = True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body, truncated = await _read_chunked(reader, max_bytes)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        body = await reader.readexactly(min(length, max_bytes))
        truncated = length > max_bytes
    else:  # the end of the body is the end of the connection
        body, framed = await _read_to_eof(reader, max_bytes), False
        truncated, body = len(body) > max_bytes, body[:max_bytes]
    keep = framed and not truncated and match[1] == b"1"
    keep = keep and headers.get("connection", "").lower() != "close"
    return Response(int(match[2]), body, truncated), keep


async def _read_to_eof(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    body = b""
    while len(body) <= max_bytes and (more := await reader.read(max_bytes + 1 - len(body))):
        body += more
    return body


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
        if size == 0:
            # The trailer section ends with an empty line; left unread, that line
            # would be taken for the next answer's status line on this connection.
            await _skip_trailers(reader)
            return bytes(body), False
        take = min(size, max_bytes + 1 - len(body))  # never hold more than we keep
        body += await reader.readexactly(take)
        if len(body) > max_bytes:
            return bytes(body[:max_bytes]), True
        await reader.readexactly(2)  # the CRLF after each chunk


async def _skip_trailers(reader: asyncio.StreamReader) -> None:
    size = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        size += len(line)
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"trailers longer than {MAX_HEADER_BYTES} bytes")
