"""The Go figures' scrape: one GET of a program's ``go_metrics`` over one
kept-alive connection, as cheap as the loop allows.

Why not `gohttp.HttpClient` (h11 over asyncio streams), which probes use:
the sampler asks each program every few seconds, and the answer's shape
never changes, so the scrape is the largest share of what sampling costs
(docs/benchmarks.md, "What bounds gosup"). Through streams and h11 one
scrape took about five turns of the loop (a task, a drain, a StreamReader
wake-up, h11's state machine per event, the task's end) and 0.5 ms of CPU.
Here the scrape is an `asyncio.BufferedProtocol`: the request's bytes are
made once, `scrape` writes them and arms one timer, and the answer is read
into one buffer shared by all, framed, parsed and handed to the caller's
callback in the turn its bytes arrive. No task, no future, no h11, and no
header looked at but the three that frame the answer.

What is framed by hand is small and bounded: a status line and headers
(at most ``MAX_HEADER_BYTES``), then a body by ``Content-Length``, chunked
(trailers read and dropped, as bounded as headers) or read to EOF, at most
``max_bytes`` of it; 1xx answers are skipped. Anything else is a scrape
error naming the problem. An ``https`` URL takes the h11 client in a task
(TLS costs more than framing anyway).

Guarantees: every scrape ends (an answer, or an error at its timeout: a
hung program stalls nothing else); the callback runs exactly once per
`scrape`, never from inside it and never after `close`; a connection the
server closed while idle is opened again, and a request it was closed under
is sent once more on a fresh one when the old connection had carried a
request before (the server may have timed it out meanwhile).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from supervisor.health import gometrics
from supervisor.health.gohttp import MAX_HEADER_BYTES, HttpClient, ScrapeError, target_of

Result = Callable[[dict[str, int] | None, str | None], None]  # (figures, error): one is None

_STATUS = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: [^\r\n]*)?(?:\r\n|$)")
# The headers that frame the answer; the others are not looked at. A line
# that is no header at all (no colon, or folded) is no HTTP answer.
_FRAMING = re.compile(
    rb"^(content-length|transfer-encoding|connection)[ \t]*:[ \t]*([^\r]*?)[ \t]*\r?$",
    re.IGNORECASE | re.MULTILINE,
)
_MALFORMED = re.compile(rb"^(?:[ \t]|[^:\r\n]*\r?$)", re.MULTILINE)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_LINE = 1024  # a chunk-size line (with extensions) longer than this is refused


class _Refused(Exception):
    """The answer cannot be read: its text is the scrape error's problem."""


# What every scraper's socket is read into (a BufferedProtocol's buffer): the
# bytes are copied out in the same call, so one buffer serves them all. A
# plain Protocol would have each read allocate asyncio's 256 KiB and shrink
# it, about 12 us of the scrape's CPU.
_READ_BUFFER = memoryview(bytearray(64 * 1024))


class _Connection(asyncio.BufferedProtocol):
    """One TCP connection of a scraper: passes what happens to it on, unless
    the scraper has moved to another connection since."""

    def __init__(self, scraper: GoScraper) -> None:
        self.scraper = scraper
        self.transport: asyncio.Transport | None = None
        self.used = False  # has carried a request before

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        if self.scraper._conn is self:
            self.scraper._received(_READ_BUFFER[:nbytes])

    def eof_received(self) -> bool:
        return False  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self.scraper._conn is self:
            self.scraper._lost()


class GoScraper:
    """Scrapes one ``go_metrics`` URL; ``on_result(figures, error)`` gets
    each answer (``error`` is the scrape error's text, URL first)."""

    def __init__(self, url: str, on_result: Result, max_bytes: int = gometrics.METRICS_MAX_BYTES):
        parts = urlsplit(url)
        self.url, self.on_result, self.max_bytes = url, on_result, max_bytes
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "", parts.port or (443 if self.https else 80)
        target = target_of(url)
        self._bad_target = any(b <= 0x20 or b == 0x7F for b in target.encode())
        self._request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "User-Agent: gosup\r\nAccept: */*\r\n\r\n"
        ).encode("latin-1", "replace")
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._h11: asyncio.Task[None] | None = None
        self._client: HttpClient | None = None  # https only
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False
        self._retried = False
        self._thread: asyncio.Future[dict[str, int]] | None = None  # a large answer's parse
        self._reset_answer()

    @property
    def busy(self) -> bool:
        """A scrape is under way (its callback has not run yet)."""
        return self._busy

    def scrape(self, timeout: float) -> None:
        """Start one scrape; its result comes to ``on_result`` later."""
        assert not self._busy, "one scrape at a time"
        loop = asyncio.get_running_loop()
        self._busy, self._retried = True, False
        if self._bad_target:
            loop.call_soon(self._fail, "cannot ask for it (a space or control byte in the path)")
            return
        if self.https:  # the h11 client has a timeout of its own
            self._h11 = loop.create_task(self._scrape_h11(timeout), name="sampler:scrape")
            return
        self._timer = loop.call_at(loop.time() + timeout, self._timed_out, timeout)
        if self._conn is None:
            self._connect(loop)
        else:
            self._send()

    def close(self) -> None:
        """Drop the connection at once (its socket closes at the loop's next
        turn) and any scrape under way: its callback never runs."""
        self._busy = False
        self._stop_waiting()
        self._reset_answer()
        if self._client is not None:
            self._client.close()
        self._drop()

    # -- the connection ----------------------------------------------------------------

    def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        conn = _Connection(self)
        self._conn = conn
        self._connecting = loop.create_task(self._open(conn), name="sampler:connect")

    async def _open(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: conn, self.host, self.port)
            error = None
        except OSError as exc:  # refused, unreachable
            error = str(exc.strerror or exc)
        if self._conn is not conn:  # closed, timed out or lost meanwhile
            if conn.transport is not None:
                conn.transport.abort()
            return
        self._connecting = None
        if error is not None:
            self._fail(error)
        else:
            self._send()

    def _send(self) -> None:
        assert self._conn is not None and self._conn.transport is not None
        self._conn.transport.write(self._request)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if conn is not None and conn.transport is not None:
            conn.transport.abort()

    def _lost(self) -> None:
        """The server closed the connection (or it broke)."""
        conn = self._conn
        assert conn is not None
        self._conn = None
        if not self._busy or self._thread is not None:
            return  # idle, or the answer is in (and being read): the next scrape connects afresh
        if self._framing == "eof" and self._head_done:
            self._complete()  # a body read to EOF ends here
        elif not self._got_bytes and conn.used and not self._retried:
            self._retried = True  # it had closed our kept-alive connection: once more
            self._connect(asyncio.get_running_loop())
        elif not self._got_bytes:
            self._fail("not an HTTP answer (closed before answering)")
        else:
            self._fail("not an HTTP answer (closed in the middle of the answer)")

    # -- the answer --------------------------------------------------------------------

    def _reset_answer(self) -> None:
        self._buf = bytearray()
        self._body = bytearray()
        self._got_bytes = self._head_done = False
        self._status, self._keep, self._framing, self._left = 0, True, "length", 0
        self._trailers = False

    def _received(self, data: bytes | memoryview) -> None:
        if not self._busy or self._thread is not None:
            self._drop()  # bytes nobody asked for: the connection cannot be trusted
            return
        self._got_bytes = True
        self._buf += data
        try:
            done = self._advance()
        except _Refused as exc:
            self._fail(str(exc))
            return
        if done:
            self._complete()

    def _advance(self) -> bool:
        """Frame what has arrived; True once the whole answer is in."""
        while not self._head_done:
            if not self._read_head():
                return False
        if self._framing == "length":
            return self._take_length()
        if self._framing == "chunked":
            return self._take_chunks()
        self._keep_body(len(self._buf))  # read to EOF
        return False

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                raise _Refused(f"not an HTTP answer (headers longer than {MAX_HEADER_BYTES} bytes)")
            return False
        if end > MAX_HEADER_BYTES:
            raise _Refused(f"not an HTTP answer (headers longer than {MAX_HEADER_BYTES} bytes)")
        head = bytes(self._buf[:end])
        del self._buf[: end + 4]
        status = _STATUS.match(head)
        if status is None:
            raise _Refused("not an HTTP answer (no HTTP/1.x status line)")
        code = int(status[2])
        if 100 <= code < 200 and code != 101:
            return True  # informational: the real answer follows
        headers = _headers(head, status.end())
        self._status, self._head_done = code, True
        self._keep = status[1] == b"1" and b"close" not in _tokens(headers.get(b"connection"))
        coding = headers.get(b"transfer-encoding")
        length = headers.get(b"content-length")
        if code in (101, 204, 304) or 100 <= code < 200:
            self._framing, self._left = "length", 0
            self._keep = self._keep and code != 101
        elif coding is not None:
            chunked = _tokens(coding)[-1:] == [b"chunked"]
            self._framing = "chunked" if chunked else "eof"
            self._keep = self._keep and chunked
        elif length is not None:
            if _DIGITS.fullmatch(length) is None:
                raise _Refused("not an HTTP answer (bad Content-Length)")
            self._framing, self._left = "length", int(length)
            if self._left > self.max_bytes:
                too_long = f"answer longer than {self.max_bytes} bytes"
                raise _Refused(f"{too_long} (Content-Length {self._left})")
        else:
            self._framing, self._keep = "eof", False
        return True

    def _take_length(self) -> bool:
        if len(self._buf) < self._left:
            return False
        if len(self._buf) > self._left:  # more than the answer: the connection is off
            self._keep = False
        self._body = self._buf[: self._left]
        return True

    def _take_chunks(self) -> bool:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > (MAX_HEADER_BYTES if self._trailers else _CHUNK_LINE):
                    raise _Refused("not an HTTP answer (a chunk line or trailer too long)")
                return False
            if self._trailers:  # after the last chunk: trailers, to an empty line
                if line_end == 0:
                    self._keep = self._keep and len(buf) == 2
                    return True
                self._left += line_end + 2
                if self._left > MAX_HEADER_BYTES:
                    raise _Refused("not an HTTP answer (trailers too long)")
                del buf[: line_end + 2]
                continue
            size = _HEX.fullmatch(bytes(buf[:line_end]).split(b";", 1)[0].strip(b" \t"))
            if size is None:
                raise _Refused("not an HTTP answer (bad chunk size)")
            n = int(size[0], 16)
            if n == 0:
                self._trailers, self._left = True, 0
                del buf[: line_end + 2]
                continue
            if len(self._body) + n > self.max_bytes:
                raise _Refused(f"answer longer than {self.max_bytes} bytes")
            if len(buf) < line_end + 2 + n + 2:
                return False
            start = line_end + 2
            if buf[start + n : start + n + 2] != b"\r\n":
                raise _Refused("not an HTTP answer (a chunk not ended by CRLF)")
            self._body += buf[start : start + n]
            del buf[: start + n + 2]

    def _keep_body(self, n: int) -> None:
        if len(self._body) + n > self.max_bytes:
            raise _Refused(f"answer longer than {self.max_bytes} bytes")
        self._body += self._buf
        self._buf.clear()

    def _complete(self) -> None:
        """The whole answer is in: ready the connection for the next one, and
        read the figures (in a thread when the answer is large)."""
        self._stop_waiting()
        conn = self._conn
        if conn is not None and self._keep:
            conn.used = True
        else:
            self._drop()
        if self._status != 200:
            self._fail(f"HTTP {self._status}")
            return
        body, self._body = bytes(self._body), bytearray()
        if len(body) <= gometrics.THREAD_ABOVE:
            self._parsed(body)
            return
        self._thread = asyncio.get_running_loop().run_in_executor(
            None, gometrics.parse_metrics, body
        )
        self._thread.add_done_callback(self._parsed_in_thread)

    def _parsed(self, body: bytes) -> None:
        try:
            figures = gometrics.parse_metrics(body)
        except ScrapeError as exc:
            self._fail(str(exc))
        else:
            self._deliver(figures, None)

    def _parsed_in_thread(self, future: asyncio.Future[dict[str, int]]) -> None:
        if not self._busy or future is not self._thread:
            return  # closed meanwhile
        exc = future.exception()
        if exc is None:
            self._deliver(future.result(), None)
        elif isinstance(exc, ScrapeError):
            self._fail(str(exc))
        else:
            self._fail(f"cannot read the answer ({exc!r})")

    # -- https: the h11 client, in a task ----------------------------------------------

    async def _scrape_h11(self, timeout: float) -> None:
        if self._client is None:
            self._client = HttpClient(self.url)
        try:
            figures = await gometrics.scrape(self.url, timeout, self._client)
        except ScrapeError as exc:
            self._h11 = None
            self._stop_waiting()
            self._deliver(None, str(exc))  # already names the URL
        else:
            self._h11 = None
            self._stop_waiting()
            self._deliver(figures, None)

    # -- the end of a scrape -----------------------------------------------------------

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self._drop()  # its state is unknown: never reused
        self._fail(f"no answer within {timeout:g}s")

    def _stop_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._h11 is not None:
            self._h11.cancel()
            self._h11 = None
        self._thread = None

    def _fail(self, problem: str) -> None:
        self._stop_waiting()
        self._drop()  # whatever the failure, the next scrape starts on a fresh connection
        self._deliver(None, f"{self.url}: {problem}")

    def _deliver(self, figures: dict[str, int] | None, error: str | None) -> None:
        if not self._busy:
            return  # closed meanwhile
        self._busy, self._thread = False, None
        self._reset_answer()
        self.on_result(figures, error)


def _headers(head: bytes, start: int) -> dict[bytes, bytes]:
    """The framing headers' names (lower case) to values, a repeated one's
    values joined by commas, from the header lines at ``head[start:]``."""
    if _MALFORMED.search(head, start) is not None:
        raise _Refused("not an HTTP answer (a malformed header line)")
    headers: dict[bytes, bytes] = {}
    for name, value in _FRAMING.findall(head, start):
        key = name.lower()
        headers[key] = headers[key] + b", " + value if key in headers else value
    return headers


def _tokens(value: bytes | None) -> list[bytes]:
    return [] if value is None else [t.strip(b" \t").lower() for t in value.split(b",")]
