"""gosup's HTTP/1.1 client for its programs' probes, leak evidence and https
``go_metrics`` scrapes: GETs over asyncio streams, framed by h11. (A plain
``http`` ``go_metrics`` scrape, asked of every program every few seconds,
has a lean client of its own for that one shape of answer:
`supervisor.health.goscrape`.)

Why not an HTTP library with a pool: scraping hundreds of programs must not
need a thread pool, and each program gets exactly one connection, kept alive
between scrapes. Why h11 rather than parsing by hand: framing (Content-Length,
chunked with trailers, read-to-EOF, ``Connection: close``, HTTP/1.0) is a
state machine that is easy to get subtly wrong, and h11 is a small, pure
Python, well-kept one. What is ours: the socket, the timeout, and the size
caps (``max_bytes`` for the body, ``MAX_HEADER_BYTES`` for headers and
trailers).

`HttpClient` keeps one connection to one host:port; `http_get` uses a
connection of its own. Every failure is a `ScrapeError` naming the URL and
the problem. A connection that cannot carry another request is closed and
dropped at once, never kept until the client goes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from supervisor.core import tls

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from ssl import SSLContext

    import h11
else:
    h11 = None  # imported by prepare(): most configurations never speak HTTP

MAX_HEADER_BYTES = 64 * 1024  # a metrics endpoint sends a few hundred bytes of headers
READ_SIZE = 64 * 1024


def prepare(https: bool = False) -> None:
    """Import what talking HTTP needs: h11 (about 0.5 MiB resident), and for
    ``https`` the ssl module (`core.tls`). An idle gosup whose configuration
    names no URL carries neither. The composition root calls this before the
    loop runs for the URLs a configuration names; a client made without it
    (a URL added by a reload) imports h11 itself, once."""
    global h11
    import h11  # binds the module's name (``global``); a dict lookup once imported

    if https:
        tls.load()


class ScrapeError(Exception):
    """An endpoint could not be read (or answered nothing usable)."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    truncated: bool  # the body was longer than max_bytes; the rest was not read


class _ClosedBeforeAnswer(ConnectionError):
    """The server closed the connection before a byte of the answer came."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection
    used: bool = False  # has carried a request before (so it may have gone stale)

    async def close(self) -> None:
        """Close the socket now and wait until it is (an unanswered request may
        still be buffered: abort, do not flush)."""
        self.writer.transport.abort()
        with contextlib.suppress(OSError):  # ssl.SSLError is an OSError
            await self.writer.wait_closed()


class HttpClient:
    """GETs from one host:port over one kept-alive HTTP/1.1 connection.

    Scraping a program every few seconds over a fresh connection costs a
    connect (and a TIME_WAIT socket) per sample: more CPU than the whole
    psutil side. The connection is opened again when the server closed it
    (a restart, an idle timeout), once per request at most.
    """

    def __init__(self, url: str) -> None:
        prepare()
        parts = urlsplit(url)
        self.base, self.netloc = f"{parts.scheme}://{parts.netloc}", parts.netloc
        self.host, self.https = parts.hostname or "", parts.scheme == "https"
        self.port = parts.port or (443 if self.https else 80)
        self._conn: _Connection | None = None
        self._tls: SSLContext | None = None  # made once, in a thread (it reads the CA store)
        self._requests: dict[tuple[str, bool], h11.Request] = {}  # built (and checked) once

    async def get(self, target: str, timeout: float, max_bytes: int, keep: bool = True) -> Response:
        """GET ``target`` (path and query); ScrapeError naming the problem."""
        url = self.base + target
        try:
            async with asyncio.timeout(timeout):
                return await self._get(target, max_bytes, keep)
        except TimeoutError:
            problem = f"no answer within {timeout:g}s"
        except _ClosedBeforeAnswer as exc:
            problem = f"not an HTTP answer ({exc})"
        except h11.RemoteProtocolError as exc:
            problem = f"not an HTTP answer ({_protocol_problem(exc)})"
        except h11.LocalProtocolError as exc:
            problem = f"cannot ask for it ({exc})"
        except OSError as exc:  # refused, reset, unreachable, TLS
            problem = str(exc.strerror or exc)
        except BaseException:
            self.close()  # cancelled mid-exchange: the connection's state is unknown
            raise
        await self.aclose()
        raise ScrapeError(f"{url}: {problem}")

    async def _get(self, target: str, max_bytes: int, keep: bool) -> Response:
        request = self._requests.get((target, keep))
        if request is None:
            request = h11.Request(method="GET", target=target, headers=self._headers(keep))
            self._requests[(target, keep)] = request
        conn = await self._connection()
        try:
            response = await self._exchange(conn, request, max_bytes)
        except ConnectionError:
            if not conn.used:
                raise
            await self.aclose()  # the server closed our idle connection: once more, afresh
            conn = await self._connection()
            response = await self._exchange(conn, request, max_bytes)
        http = conn.http
        if keep and http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
            conn.used = True
        else:  # Connection: close, HTTP/1.0, read to EOF, or a body cut at max_bytes
            await self.aclose()
        return response

    def _headers(self, keep: bool) -> list[tuple[str, str]]:
        headers = [("Host", self.netloc), ("User-Agent", "gosup"), ("Accept", "*/*")]
        return headers if keep else [*headers, ("Connection", "close")]

    async def _connection(self) -> _Connection:
        if self._conn is None:
            ctx = await self._tls_context() if self.https else None
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ctx)
            http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
            self._conn = _Connection(reader, writer, http)
        return self._conn

    async def _tls_context(self) -> SSLContext:
        """The client's TLS context. The first one loads ssl and OpenSSL's libssl
        into gosup (`core.tls`: an idle gosup without https does not carry
        them) and every one reads the system's CA certificates: disk work, so
        in a thread, once per client."""
        if self._tls is None:
            self._tls = await asyncio.to_thread(_default_context)
        return self._tls

    async def _exchange(self, conn: _Connection, request: h11.Request, max_bytes: int) -> Response:
        conn.writer.write(conn.http.send(request) + conn.http.send(h11.EndOfMessage()))
        await conn.writer.drain()
        status, body, truncated = 0, bytearray(), False
        while True:
            event = await _next_event(conn)
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                room = max_bytes - len(body)
                body += event.data[: max(room, 0)]
                if len(event.data) > room:  # never read (or hold) more than we keep
                    truncated = True
                    break
            elif isinstance(event, h11.EndOfMessage):
                break
            # InformationalResponse (1xx): the real answer follows
        return Response(status, bytes(body), truncated)

    def close(self) -> None:
        """Drop the connection; its socket closes at the loop's next turn."""
        if self._conn is not None:
            self._conn.writer.transport.abort()
            self._conn = None

    async def aclose(self) -> None:
        """Close the connection and wait until its socket is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _default_context() -> SSLContext:
    tls.load()  # ssl, and asyncio made able to use it
    import ssl

    return ssl.create_default_context()


async def _next_event(conn: _Connection) -> object:
    """The next h11 event of the answer, reading from the socket as h11 needs."""
    http = conn.http
    while True:
        event = http.next_event()
        if event is not h11.NEED_DATA:
            break
        answered = http.their_state is not h11.SEND_RESPONSE or bool(http.trailing_data[0])
        data = await conn.reader.read(READ_SIZE)
        if not data and not answered:
            raise _ClosedBeforeAnswer("closed before answering")
        http.receive_data(data)
    if isinstance(event, h11.ConnectionClosed):
        raise _ClosedBeforeAnswer("closed before answering")
    return event


def _protocol_problem(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:  # h11's "Receive buffer too long"
        return f"headers longer than {MAX_HEADER_BYTES} bytes"
    return str(exc)


def target_of(url: str) -> str:
    """The request target (path and query) of ``url``."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def http_get(url: str, timeout: float, max_bytes: int) -> Response:
    """GET ``url`` on a connection of its own; ScrapeError naming the problem."""
    client = HttpClient(url)
    try:
        return await client.get(target_of(url), timeout, max_bytes, keep=False)
    finally:
        await client.aclose()
