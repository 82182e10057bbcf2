"""The Go figures' scrape (health/goscrape.py): real goapp programs for the
figures, keep-alive and restarts; real sockets served by the test for the
answers a Go program does not give (hung, cut, chunked, too big, read to
EOF, informational, garbage); a real TLS server for https. Every wait has a
deadline; every process started here is killed and reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import free_port, self_signed_cert, wait_for

from supervisor.health import gometrics
from supervisor.health.goscrape import GoScraper

Answer = tuple[dict[str, int] | None, str | None]
PROM = b"# HELP go_goroutines x\ngo_goroutines 7\ngo_memstats_heap_inuse_bytes 4096\n"


class Probe:
    """A GoScraper whose results land in a queue, with every callback counted."""

    def __init__(self, url: str, max_bytes: int = gometrics.METRICS_MAX_BYTES) -> None:
        self.results: asyncio.Queue[Answer] = asyncio.Queue()
        self.scraper = GoScraper(url, lambda go, err: self.results.put_nowait((go, err)), max_bytes)

    async def once(self, timeout: float = 5.0) -> Answer:
        self.scraper.scrape(timeout)
        async with asyncio.timeout(timeout + 10):  # the scrape's own timeout ends it first
            answer = await self.results.get()
        assert not self.scraper.busy
        return answer


@contextlib.contextmanager
def goapp_on(goapp: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [str(goapp), "-name", "scraped", "-http", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(port), 20, "goapp's port")
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _established(pid: int, port: int) -> int:
    return sum(
        1
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
    )


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server on 127.0.0.1 running ``handler`` per connection: (its base
    URL, the connections it accepted so far as a one-item list)."""
    accepted = [0]
    handlers: set[asyncio.Task[None]] = set()
    writers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers[task] = writer
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
            handlers.discard(task)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/metrics", accepted
    finally:
        server.close()
        for task in list(handlers):
            writers[task].transport.abort()  # the handler's read ends: it returns
        async with asyncio.timeout(10):
            await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def answering(*parts: bytes, then: str = "stay", requests: int = 1_000_000) -> Handler:
    """A handler that writes ``parts`` (a write each) per request, then stays
    open (``stay``) or closes (``close``); after ``requests`` requests it
    closes when the next one comes (``close-on-next``) or hangs."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(requests):
            await reader.readuntil(b"\r\n\r\n")
            for part in parts:
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)  # separate reads on the other side
            if then == "close":
                writer.close()  # after what was written
                await writer.wait_closed()
                return
        if then == "close-on-next":  # an idle timeout that strikes as the next request comes
            await reader.readuntil(b"\r\n\r\n")
            return
        await reader.read()  # hang: until the other side (or the test's end) closes

    return handle


def ok(body: bytes, *headers: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    head += b"".join(h + b"\r\n" for h in headers)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


# -- real Go programs ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/debug/vars", "/debug/pprof/goroutine?debug=1"])
def test_figures_of_each_format_over_one_kept_alive_connection(goapp: Path, path: str) -> None:
    port = free_port()
    with goapp_on(goapp, port) as proc:

        async def main() -> None:
            probe = Probe(f"http://127.0.0.1:{port}{path}")
            for _ in range(5):
                go, error = await probe.once()
                assert error is None and go is not None
                assert go["goroutines"] >= 2
                if "pprof" not in path:
                    assert go["heap_inuse_bytes"] > 0
            assert _established(proc.pid, port) == 1  # five scrapes, one connection
            probe.scraper.close()
            await asyncio.sleep(0)
            wait_for(lambda: _established(proc.pid, port) == 0, 10, "the connection closed")

        asyncio.run(main())


def test_expvar_read_by_pattern_equals_json(goapp: Path) -> None:
    port = free_port()
    with goapp_on(goapp, port):
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/vars", timeout=10).read()
    assert body.startswith(b'{\n"')  # the layout the pattern reads
    data = json.loads(body)
    expected = {"goroutines": data["goroutines"], "heap_inuse_bytes": data["memstats"]["HeapInuse"]}
    assert gometrics.parse_metrics(body) == expected
    # Laid out otherwise (another JSON writer): json.loads reads it the same.
    assert gometrics.parse_metrics(json.dumps(data).encode()) == expected
    assert gometrics.parse_metrics(b'{\n"goroutines": 3\n}') == {"goroutines": 3}


def test_a_restarted_program_is_scraped_over_a_new_connection(goapp: Path) -> None:
    port = free_port()

    async def main() -> None:
        probe = Probe(f"http://127.0.0.1:{port}/metrics")
        with goapp_on(goapp, port):
            assert (await probe.once())[1] is None
        go, error = await probe.once()  # nobody listens now
        assert go is None and error is not None and f"127.0.0.1:{port}" in error
        with goapp_on(goapp, port) as second:
            go, error = await probe.once()
            assert error is None and go is not None and go["goroutines"] >= 2
            assert _established(second.pid, port) == 1
        probe.scraper.close()

    asyncio.run(main())


def test_a_hung_program_stalls_neither_the_loop_nor_other_scrapes(goapp: Path) -> None:
    port = free_port()
    with goapp_on(goapp, port):

        async def main() -> None:
            async with serving(answering(then="hang")) as (hung_url, _):
                hung, good = Probe(hung_url), Probe(f"http://127.0.0.1:{port}/metrics")
                hung.scraper.scrape(1.0)
                start = time.monotonic()
                for _ in range(3):  # meanwhile, the other program answers
                    assert (await good.once())[1] is None
                go, error = await hung.results.get()
                assert go is None and error == f"{hung_url}: no answer within 1s"
                assert time.monotonic() - start < 8
                # the hung connection is dropped: the next scrape opens another
                assert not hung.scraper.busy and hung.scraper._conn is None
                good.scraper.close()

        asyncio.run(main())


# -- answers a Go program does not give ---------------------------------------------


async def _answers(handler: Handler, times: int = 1, max_bytes: int = 1 << 20) -> list[Answer]:
    async with serving(handler) as (url, accepted):
        probe = Probe(url, max_bytes)
        try:
            answers = [await probe.once(2.0) for _ in range(times)]
        finally:
            probe.scraper.close()
        answers.append((None, f"accepted {accepted[0]}"))
        return answers


FIGURES = {"goroutines": 7, "heap_inuse_bytes": 4096}
BIG = PROM + b"# padding\n" * 30_000
assert len(BIG) > gometrics.THREAD_ABOVE
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"%x;ext=1\r\n%s\r\n" % (20, PROM[:20]),
    b"%x\r\n%s\r\n" % (len(PROM) - 20, PROM[20:]),
    b"0\r\nX-Trailer: yes\r\n\r\n",
)


@pytest.mark.parametrize(
    ("parts", "then", "times", "answer", "connections"),
    [
        ((ok(PROM),), "stay", 3, FIGURES, 1),  # kept alive
        (CHUNKED, "stay", 3, FIGURES, 1),  # chunked, cut across reads, with trailers
        ((ok(PROM, b"Connection: close"),), "close", 3, FIGURES, 3),
        ((b"HTTP/1.0 200 OK\r\n\r\n", PROM), "close", 2, FIGURES, 2),  # read to EOF
        ((b"HTTP/1.1 100 Continue\r\n\r\n", ok(PROM)), "stay", 2, FIGURES, 1),
        # closes an answered keep-alive connection (an idle timeout): asked again
        ((ok(PROM),), "close", 3, FIGURES, 3),
        # over THREAD_ABOVE: read in a thread, while the server closes the connection
        ((ok(BIG),), "close", 2, FIGURES, 2),
    ],
    ids=["length", "chunked", "connection-close", "eof", "continue", "server-closes-idle", "big"],
)
def test_answers_framed_every_way_give_the_figures(
    parts: tuple[bytes, ...], then: str, times: int, answer: dict[str, int], connections: int
) -> None:
    answers = asyncio.run(_answers(answering(*parts, then=then), times))
    assert answers[:-1] == [(answer, None)] * times
    assert answers[-1][1] == f"accepted {connections}"


def test_a_request_the_server_closed_under_is_asked_again_once() -> None:
    # Each connection answers one request and closes under the next one
    # unanswered: that one is sent again on a new connection, and answered.
    handler = answering(ok(PROM), then="close-on-next", requests=1)
    answers = asyncio.run(_answers(handler, 3))
    assert answers == [(FIGURES, None)] * 3 + [(None, "accepted 3")]
    # A fresh connection closed unanswered is not asked again.
    answers = asyncio.run(_answers(answering(then="close-on-next", requests=0)))
    assert answers[0][1] is not None and "closed before answering" in answers[0][1]
    assert answers[1] == (None, "accepted 1")


@pytest.mark.parametrize(
    ("parts", "then", "problem"),
    [
        ((ok(PROM).replace(b"Length: 7", b"Length: 1000"),), "close", "closed in the middle"),
        ((CHUNKED[0], CHUNKED[1]), "close", "closed in the middle"),
        ((), "close", "closed before answering"),
        ((b"SSH-2.0-OpenSSH_9.6\r\n\r\n",), "stay", "no HTTP/1.x status line"),
        ((b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000,), "stay", "headers longer than 65536"),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n",), "stay", "Length 5000000"),
        ((b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 700_000), "close", "longer than 524288 bytes"),
        ((CHUNKED[0], b"%x\r\n" % 700_000 + b"x" * 700_000), "stay", "longer than 524288"),
        ((CHUNKED[0], b"zz\r\n"), "stay", "bad chunk size"),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",), "stay", "bad Content-Length"),
        ((ok(b"not found\n").replace(b"200 OK", b"404 Not Found"),), "stay", "HTTP 404"),
        ((ok(b"<html>hello</html>"),), "stay", "no go_goroutines"),
    ],
    ids=["cut-length", "cut-chunked", "closed", "garbage", "long-headers", "too-big-length",
         "too-big-eof", "too-big-chunked", "bad-chunk", "bad-length", "404", "not-go"],
)  # fmt: skip
def test_unreadable_answers_are_scrape_errors_naming_the_problem(
    parts: tuple[bytes, ...], then: str, problem: str
) -> None:
    answers = asyncio.run(_answers(answering(*parts, then=then), max_bytes=512 * 1024))
    go, error = answers[0]
    assert go is None and error is not None and error.startswith("http://127.0.0.1:")
    assert problem in error, error


def test_close_mid_scrape_drops_the_callback_and_the_socket() -> None:
    async def main() -> None:
        asked, closed = asyncio.Event(), asyncio.Event()

        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            asked.set()
            await reader.read()  # EOF or reset: the scraper's socket is closed
            closed.set()

        async with serving(hang) as (url, _):
            probe = Probe(url)
            probe.scraper.scrape(30.0)
            async with asyncio.timeout(10):
                await asked.wait()
            probe.scraper.close()
            async with asyncio.timeout(10):
                await closed.wait()
            assert probe.results.empty() and not probe.scraper.busy

    asyncio.run(main())


# -- https: the h11 client -----------------------------------------------------------


def test_https_scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(ok(PROM))
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        try:
            probe = Probe(f"https://127.0.0.1:{port}/metrics")
            assert await probe.once() == (FIGURES, None)
            assert await probe.once() == (FIGURES, None)
            probe.scraper.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
