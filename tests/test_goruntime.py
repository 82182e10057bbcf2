"""Go runtime figures, the HTTP client, dumps and the Go environment
(supervisor/health/gometrics.py, gohttp.py, evidence.py, goenv.py; the cgroup
parser in supervisor/core/cgroup.py): parsers on real answers, the client
against local servers, the three endpoints of a real Go program."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from supervisor import config as configmod
from supervisor.core import cgroup
from supervisor.health import evidence, goenv, gohttp, gometrics
from supervisor.health.goenv import CgroupLimits
from supervisor.health.gohttp import ScrapeError

PROMETHEUS = b"""\
# HELP go_gc_duration_seconds A summary of the pause duration of garbage collection cycles.
# TYPE go_gc_duration_seconds summary
go_gc_duration_seconds{quantile="0"} 2.3e-05
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
# HELP go_memstats_heap_inuse_bytes Number of heap bytes that are in use.
# TYPE go_memstats_heap_inuse_bytes gauge
go_memstats_heap_inuse_bytes 1.2345678e+07
go_memstats_heap_inuse_bytes_total 99
"""

EXPVAR = b"""{
"cmdline": ["./api"],
"goroutines": 17,
"memstats": {"Alloc": 1000, "HeapInuse": 4096000, "BySize": [{"Size": 0}]}
}"""

PPROF = b"""goroutine profile: total 1234
1000 @ 0x43e2ce 0x44f0e5
#\t0x4d3a44\tmain.startLeaks.func1.1+0x24\t/src/main.go:500
"""


# -- parsing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (PROMETHEUS, {"goroutines": 42, "heap_inuse_bytes": 12345678}),
        (EXPVAR, {"goroutines": 17, "heap_inuse_bytes": 4096000}),
        (PPROF, {"goroutines": 1234}),
        (b'go_goroutines{job="x"} 7\n', {"goroutines": 7}),
        (b'\n  {"memstats": {"HeapInuse": 5}}', {"heap_inuse_bytes": 5}),
        # Go's layout for memstats, goroutines published in another one: both read.
        (
            b'{\n"goroutines": {"n": 3},\n"memstats": {"Alloc":1,"HeapInuse":9,"BySize":[]}\n}',
            {"heap_inuse_bytes": 9},
        ),
        (
            b'{\n"memstats": {"Alloc":1,"HeapInuse":9,"BySize":[]},\n"goroutines": 4\n}',
            {"heap_inuse_bytes": 9, "goroutines": 4},
        ),
    ],
    ids=[
        "prometheus",
        "expvar",
        "pprof",
        "prometheus-labels",
        "expvar-no-goroutines",
        "expvar-goroutines-not-a-count",
        "expvar-go-layout",
    ],
)
def test_parse_metrics_reads_each_format(body: bytes, expected: dict[str, int]) -> None:
    assert gometrics.parse_metrics(body) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>Not Found</html>", "no go_goroutines"),
        (b"ok\n", "no go_goroutines"),
        (b"", "no go_goroutines"),
        (b"{not json", "does not parse"),
        (b'{"memstats": {"HeapInuse": "lots"}}', "neither memstats.HeapInuse"),
        (b"[1, 2]", "no go_goroutines"),
        (b"go_goroutines NaN\n", "no go_goroutines"),
        (b"go_goroutines -3\n", "no go_goroutines"),
        (b"\xff\xfe garbage", "no go_goroutines"),
    ],
)
def test_parse_metrics_rejects_garbage(body: bytes, message: str) -> None:
    with pytest.raises(ScrapeError, match=message):
        gometrics.parse_metrics(body)


def test_pprof_url_keeps_scheme_and_host() -> None:
    url = evidence.pprof_url("http://[::1]:6060/metrics?x=1", evidence.GOROUTINE_DUMP_PATH)
    assert url == "http://[::1]:6060/debug/pprof/goroutine?debug=2"


# -- the HTTP client, against a local server -----------------------------------------

Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def serve_and_get(respond: Responder, max_bytes: int = 1 << 20, timeout: float = 5.0) -> object:
    """Run a one-off local server answering with ``respond``; GET from it."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        try:
            await respond(reader, writer)
        finally:
            writer.close()

    async def main() -> gohttp.Response:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await gohttp.http_get(f"http://127.0.0.1:{port}/m?a=1", timeout, max_bytes)
        finally:
            server.close()
            await server.wait_closed()

    response = asyncio.run(main())
    assert seen and seen[0].startswith(b"GET /m?a=1 HTTP/1.1\r\nHost: 127.0.0.1:")
    return response


def answer(raw: bytes) -> Responder:
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return respond


def test_http_get_reads_content_length() -> None:
    r = serve_and_get(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    assert r == gohttp.Response(200, b"hello", False)


def test_http_get_reads_chunked() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw += b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n"
    assert serve_and_get(answer(raw)) == gohttp.Response(200, b"abcdefg", False)


def test_http_get_reads_to_eof_without_length() -> None:
    r = serve_and_get(answer(b"HTTP/1.0 404 Not Found\r\n\r\nnope"))
    assert r == gohttp.Response(404, b"nope", False)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n" + b"x" * 10000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2710\r\n"
        + b"x" * 10000
        + b"\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10000,
    ],
    ids=["length", "chunked", "eof"],
)
def test_http_get_stops_at_max_bytes(raw: bytes) -> None:
    assert serve_and_get(answer(raw), max_bytes=100) == gohttp.Response(200, b"x" * 100, True)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "not an HTTP answer"),
        (b"", "not an HTTP answer"),
    ],
    ids=["not-http", "cut-body", "cut-headers", "empty"],
)
def test_http_get_names_a_broken_answer(raw: bytes, message: str) -> None:
    with pytest.raises(ScrapeError, match=message):
        serve_and_get(answer(raw))


def test_http_get_times_out() -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    with pytest.raises(ScrapeError, match=r"no answer within 0\.3s"):
        serve_and_get(never, timeout=0.3)


def test_http_get_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        with pytest.raises(ScrapeError, match=r"127\.0\.0\.1"):
            asyncio.run(gohttp.http_get(f"http://127.0.0.1:{port}/", 2.0, 100))


def test_scrape_names_a_non_200_answer() -> None:
    async def main() -> None:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await w.drain()
            w.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(ScrapeError, match="HTTP 404"):
                await gometrics.scrape(f"http://127.0.0.1:{port}/metrics", 2.0)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


async def stopped(server: asyncio.Server, handlers: list[Any]) -> None:
    """Close the server and wait for its connection handlers (3.11 does not)."""
    server.close()
    await server.wait_closed()
    await asyncio.wait_for(asyncio.gather(*handlers), 10)


def test_http_client_keeps_its_connection_and_reopens_a_closed_one() -> None:
    served: list[int] = []  # requests served, per connection

    handlers: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        served.append(0)
        me = len(served) - 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while served[me] < 2:  # this server closes a connection after two requests
                await reader.readuntil(b"\r\n\r\n")
                served[me] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    async def main() -> list[bytes]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = gohttp.HttpClient(f"http://127.0.0.1:{port}/metrics")
        try:
            return [(await client.get("/metrics", 5.0, 100)).body for _ in range(5)]
        finally:
            await client.aclose()
            await stopped(server, handlers)

    assert asyncio.run(main()) == [b"ok"] * 5
    assert served == [2, 2, 1]


def kept_alive(answers: list[bytes], max_bytes: int = 1 << 20) -> tuple[list[object], list[int]]:
    """GET once per answer through one HttpClient against a server that answers
    each request on a connection with the next answer; the bodies (or the
    ScrapeError), and how many requests each connection carried."""
    served: list[int] = []
    handlers: list[Any] = []
    queue = list(answers)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        served.append(0)
        me = len(served) - 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while queue:
                await reader.readuntil(b"\r\n\r\n")
                served[me] += 1
                writer.write(queue.pop(0))
                await writer.drain()
            await reader.read()  # until the client closes
        writer.close()

    async def main() -> list[object]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = gohttp.HttpClient(f"http://127.0.0.1:{port}/metrics")
        got: list[object] = []
        try:
            for _ in answers:
                try:
                    got.append((await client.get("/metrics", 5.0, max_bytes)).body)
                except ScrapeError as exc:
                    got.append(exc)
        finally:
            await client.aclose()
            await stopped(server, handlers)
        return got

    return asyncio.run(main()), served


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_chunked_answers_twice_in_a_row_on_one_connection() -> None:
    bodies, served = kept_alive([CHUNKED, CHUNKED])
    assert bodies == [b"abcde", b"abcde"] and served == [2]


def test_chunked_trailers_are_read_and_the_connection_kept() -> None:
    with_trailer = CHUNKED.replace(b"0\r\n\r\n", b"0\r\nX-Checksum: 1\r\n\r\n")
    bodies, served = kept_alive([with_trailer, LENGTH])
    assert bodies == [b"abcde", b"ok"] and served == [2]


def test_a_body_over_the_cap_is_cut_and_its_connection_dropped() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    bodies, served = kept_alive([big, LENGTH], max_bytes=10)
    assert bodies == [b"x" * 10, b"ok"] and served == [1, 1]


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 2000 OK", b"HTTP/1.1 OK", b"HTTP/2 200", b"ICY 200 OK"],
)
def test_a_malformed_status_line_is_a_scrape_error(status_line: bytes) -> None:
    bodies, served = kept_alive([status_line + b"\r\nContent-Length: 2\r\n\r\nok", LENGTH])
    assert isinstance(bodies[0], ScrapeError) and "not an HTTP answer" in str(bodies[0])
    assert bodies[1] == b"ok" and served == [1, 1]  # a fresh connection for the next one


def test_a_connection_close_answer_closes_the_socket_at_once() -> None:
    """The client closes its end as soon as it has the answer; it keeps no
    closed connection around until it is itself closed."""
    eof_after: list[float] = []
    seen_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
        await writer.drain()
        start = time.monotonic()
        await asyncio.wait_for(reader.read(), 10)  # EOF: the client closed its end
        eof_after.append(time.monotonic() - start)
        seen_eof.set()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = gohttp.HttpClient(f"http://127.0.0.1:{port}")
        try:
            assert (await client.get("/", 5.0, 100)).body == b"x"
            assert client._conn is None
            await asyncio.wait_for(seen_eof.wait(), 10)
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
    assert eof_after and eof_after[0] < 5


def test_http_client_does_not_reuse_a_connection_the_server_closes() -> None:
    connections = []

    handlers: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        connections.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
        await writer.drain()
        await asyncio.sleep(0.5)  # the client must not wait for this close
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = gohttp.HttpClient(f"http://127.0.0.1:{port}")
        try:
            for _ in range(3):
                assert (await client.get("/", 5.0, 100)).body == b"x"
        finally:
            await client.aclose()
            await stopped(server, handlers)

    asyncio.run(main())
    assert len(connections) == 3 and b"Connection: close" not in connections[0]


# -- a real Go program's three endpoints ------------------------------------------------


@pytest.fixture
def go_http(goapp: Path, tmp_path: Path) -> Iterator[str]:
    """A goapp serving /metrics, /debug/vars and /debug/pprof; yields host:port."""
    addr_file = tmp_path / "addr"
    proc = subprocess.Popen(
        [str(goapp), "-http", "127.0.0.1:0", "-addr-file", str(addr_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(addr_file.exists, 20, "the goapp HTTP address")
        yield addr_file.read_text().strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


@pytest.mark.parametrize(
    ("path", "keys"),
    [
        ("/metrics", {"goroutines", "heap_inuse_bytes"}),
        ("/debug/vars", {"goroutines", "heap_inuse_bytes"}),
        ("/debug/pprof/goroutine?debug=1", {"goroutines"}),
    ],
    ids=["prometheus", "expvar", "pprof"],
)
def test_scrape_reads_a_real_go_program(go_http: str, path: str, keys: set[str]) -> None:
    figures = asyncio.run(gometrics.scrape(f"http://{go_http}{path}", 10.0))
    assert set(figures) == keys
    assert figures["goroutines"] >= 2  # main, the HTTP server, the signal watcher ...
    assert figures.get("heap_inuse_bytes", 1) > 0


def test_fetch_dump_saves_a_goroutine_dump(go_http: str, tmp_path: Path) -> None:
    url = evidence.pprof_url(f"http://{go_http}/metrics", evidence.GOROUTINE_DUMP_PATH)
    path = asyncio.run(evidence.fetch_dump(url, tmp_path / "d" / "x.txt", 1 << 20, 10.0))
    text = path.read_text()
    assert text.startswith("goroutine ") and "main.main()" in text
    assert os.stat(path).st_mode & 0o777 == 0o600


# -- dumps on disk ---------------------------------------------------------------------


def test_write_dump_caps_the_size_with_a_note(tmp_path: Path) -> None:
    path = evidence.write_dump(tmp_path / "a.txt", b"y" * 5000, max_size=1000)
    data = path.read_bytes()
    assert len(data) == 1000
    assert data.endswith(evidence.TRUNCATED_NOTE)
    assert evidence.write_dump(tmp_path / "b.txt", b"z" * 10, 1000).read_bytes() == b"z" * 10
    cut = evidence.write_dump(tmp_path / "c.pb.gz", b"\x1f\x8b" + b"q" * 5000, 1000)
    assert cut.read_bytes() == (b"\x1f\x8b" + b"q" * 5000)[: 1000 - len(evidence.TRUNCATED_NOTE)]
    assert not list(tmp_path.glob(".*.tmp"))


def test_dump_stems_are_unique_and_pruning_keeps_the_newest(tmp_path: Path) -> None:
    stems = []
    for _ in range(5):
        stem = evidence.dump_stem(tmp_path, "api")
        stems.append(stem)
        (tmp_path / f"{stem}-goroutines.txt").write_text("g")
        (tmp_path / f"{stem}-heap.pb.gz").write_text("h")
    assert len(set(stems)) == 5
    other = tmp_path / f"{evidence.dump_stem(tmp_path, 'api-2')}-sigquit.txt"
    other.write_text("other program")
    (tmp_path / "notes.txt").write_text("not a dump")
    removed = evidence.prune_dumps(tmp_path, "api", keep=2)
    assert len(removed) == 6
    left = sorted(p.name for p in tmp_path.iterdir())
    kept = sorted(f"{s}-{k}" for s in stems[-2:] for k in ("goroutines.txt", "heap.pb.gz"))
    assert left == sorted([*kept, other.name, "notes.txt"])


def test_goroutine_traces_start_at_the_sigquit_header() -> None:
    assert evidence.goroutine_traces(b"log line\nSIGQUIT: quit\nPC=0\n") == b"SIGQUIT: quit\nPC=0\n"
    assert evidence.goroutine_traces(b"no header") == b"no header"


def test_a_sigquit_capture_is_saved_only_when_the_run_ended_by_sigquit(tmp_path: Path) -> None:
    """The capture taps stderr from before the restart is asked for; if the
    restart was refused (no SIGQUIT went out), what came is no dump."""
    saved: list[Path] = []

    async def on_saved(path: Path) -> None:
        saved.append(path)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for name, outcome in (("quit", signal.SIGQUIT), ("term", signal.SIGTERM), ("gone", None)):
            capture = evidence.SigquitCapture("api", tmp_path / name, 1 << 20, on_saved)
            capture.feed(b"ordinary log line\n")
            capture.feed(b"SIGQUIT: quit\nPC=0x0\n\ngoroutine 1 [running]:\nmain.main()\n")
            ended: asyncio.Future[int | None] = loop.create_future()
            ended.set_result(outcome)
            if capture.wanted(ended):
                await capture.save()
        refused = evidence.SigquitCapture("api", tmp_path / "refused", 1 << 20, on_saved)
        refused.feed(b"ordinary log line\n")
        ended = loop.create_future()
        ended.cancel()
        assert not refused.wanted(ended)

    asyncio.run(main())
    assert saved == [tmp_path / "quit"]
    assert saved[0].read_text().startswith("SIGQUIT: quit\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quit"]


def test_a_sigquit_capture_keeps_dump_max_size(tmp_path: Path) -> None:
    saved: list[Path] = []

    async def on_saved(path: Path) -> None:
        saved.append(path)

    async def main() -> None:
        capture = evidence.SigquitCapture("api", tmp_path / "d.txt", 100, on_saved)
        capture.feed(b"SIGQUIT: quit\n" + b"g" * 500)
        ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        ended.set_result(signal.SIGQUIT)
        assert capture.wanted(ended)
        await capture.save()

    asyncio.run(main())
    data = saved[0].read_bytes()
    assert len(data) == 100 and data.endswith(evidence.TRUNCATED_NOTE)


# -- the cgroup parser (core) --------------------------------------------------------


def test_cgroup_paths_name_each_controller(tmp_path: Path) -> None:
    (tmp_path / "cgroup").write_text(
        "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\nnot a cgroup line\n0::/user.slice\n"
    )
    assert cgroup.cgroup_paths(tmp_path) == {
        "memory": "docker/abc", "cpu": "docker/abc", "cpuacct": "docker/abc", "": "user.slice",
    }  # fmt: skip
    assert cgroup.cgroup_paths(tmp_path / "missing") == {}


def test_oom_kills_read_memory_events_of_our_cgroup(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cg"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/system.slice/app.service\n")
    events = root / "system.slice" / "app.service" / "memory.events"
    events.parent.mkdir(parents=True)
    events.write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert cgroup.oom_kills(root, proc) == 2
    events.unlink()
    assert cgroup.oom_kills(root, proc) == 0
    assert cgroup.oom_kills() >= 0  # this machine's, whatever it is


# -- cgroups and the Go environment --------------------------------------------------


def fake_cgroup(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> CgroupLimits:
    root, proc = tmp_path / "cg", tmp_path / "proc"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(proc_cgroup)
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    return goenv.cgroup_limits(root, proc)


def test_cgroup_v2_takes_the_tightest_limit_on_the_path(tmp_path: Path) -> None:
    limits = fake_cgroup(
        tmp_path,
        "0::/system.slice/app.service\n",
        {
            "cgroup.controllers": "cpu memory",
            "memory.max": "max",
            "system.slice/memory.max": "1073741824\n",
            "system.slice/app.service/memory.max": "max\n",
            "system.slice/app.service/cpu.max": "150000 100000\n",
        },
    )
    assert limits == CgroupLimits(memory=1 << 30, cpus=1.5)


def test_cgroup_v2_without_limits(tmp_path: Path) -> None:
    limits = fake_cgroup(
        tmp_path, "0::/\n", {"cgroup.controllers": "", "memory.max": "max", "cpu.max": "max 100000"}
    )
    assert limits == CgroupLimits(None, None)


def test_cgroup_v1_and_a_namespaced_mount(tmp_path: Path) -> None:
    # The path in /proc/self/cgroup does not exist under the mount: a container
    # whose cgroup namespace makes the mount root its own cgroup.
    limits = fake_cgroup(
        tmp_path,
        "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
        {
            "memory/memory.limit_in_bytes": "536870912\n",
            "cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert limits == CgroupLimits(memory=512 << 20, cpus=2.0)
    unlimited = fake_cgroup(
        tmp_path / "u",
        "4:memory:/\n1:cpu:/\n",
        {
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert unlimited == CgroupLimits(None, None)


def test_cgroup_limits_of_this_machine_do_not_fail() -> None:
    limits = goenv.cgroup_limits()
    assert limits.memory is None or limits.memory > 0
    assert limits.cpus is None or limits.cpus > 0


def spec(tmp_path: Path, extra: str = "", limits: str = "") -> configmod.ProgramSpec:
    text = f'[programs.api]\ncommand = ["./api"]\n{extra}\n'
    if limits:
        text += f"[programs.api.limits]\n{limits}\n"
    return configmod.loads(text, tmp_path / "app.toml").program("api")


NO_CGROUP = CgroupLimits(None, None)


@pytest.mark.parametrize(
    ("extra", "limits", "cgroup", "inherited", "expected"),
    [
        ("", "rss = '512MiB'", NO_CGROUP, {}, {"GOMEMLIMIT": "460MiB"}),
        ("", "rss = '2GiB'", CgroupLimits(1 << 30, None), {}, {"GOMEMLIMIT": "921MiB"}),
        ("", "", CgroupLimits(1 << 30, None), {}, {"GOMEMLIMIT": "921MiB"}),
        ("", "rss = 1000", NO_CGROUP, {}, {"GOMEMLIMIT": "900B"}),
        ("", "", NO_CGROUP, {}, {}),
        ("environment = { GOMEMLIMIT = '1GiB' }", "rss = '512MiB'", NO_CGROUP, {}, {}),
        ("", "rss = '512MiB'", NO_CGROUP, {"GOMEMLIMIT": "off"}, {}),
        ("go_env = false", "rss = '512MiB'", CgroupLimits(1 << 30, 0.5), {}, {}),
        ("", "", CgroupLimits(None, 0.5), {}, {"GOMAXPROCS": "1"}),
        ("", "", CgroupLimits(None, 1.2), {}, {"GOMAXPROCS": "2"}),
        ("environment = { GOMAXPROCS = '8' }", "", CgroupLimits(None, 1.0), {}, {}),
        ("", "", CgroupLimits(None, 10_000.0), {}, {}),  # more than the machine has
    ],
)
def test_go_env(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: str,
    limits: str,
    cgroup: CgroupLimits,
    inherited: dict[str, str],
    expected: dict[str, str],
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert goenv.go_env(spec(tmp_path, extra, limits), cgroup, inherited) == expected


def test_go_env_looks_at_gosups_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOMEMLIMIT", "3GiB")
    with contextlib.suppress(KeyError):
        monkeypatch.delenv("GOMAXPROCS")
    assert goenv.go_env(spec(tmp_path, limits="rss = '1GiB'"), NO_CGROUP) == {}
