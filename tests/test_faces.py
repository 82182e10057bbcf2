"""gosup's faces under hostile load: the control socket and /metrics under
a flood of idle connections, parsers given untrusted input, and gosup's own
log when nobody reads its stderr (issue 15: 15.5, 15.6, 15.7; 16.6).

Each test runs a real gosup (tests/conftest.py) against real sockets, with
a real Go program crash-looping beside it where the point is that
supervision goes on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.server
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gosup, free_port, gosup_check, wait_for

from supervisor.health import gometrics

FLOOD = 2000
GOSUP_NOFILE = 1024


def crashloop(goapp: Path, port: int, extra: str = "", say: str = "") -> str:
    """An app.toml: /metrics on ``port`` and a program that exits 1 after 300 ms,
    forever (saying ``say`` on stderr at each start)."""
    said = f', "-stderr-line", "{say}"' if say else ""
    return f"""
        [supervisor]
        metrics_listen = "127.0.0.1:{port}"
        {extra}

        [programs.crashy]
        command = ["{goapp}", "-mode", "exit", "-code", "1", "-after", "300ms"{said}]
        start_seconds = "100ms"

        [programs.crashy.backoff]
        initial = "50ms"
        max = "100ms"
        jitter = 0.0
        give_up_after = 0
    """


@contextlib.contextmanager
def own_nofile(needed: int) -> Iterator[None]:
    """Raise this process's open-file limit to ``needed`` (skip when the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files in the test process; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_idle(family: int, address: Any, count: int, within: float) -> list[socket.socket]:
    """Up to ``count`` connections to ``address`` that never send a byte.

    Non-blocking, so that a full accept queue costs a retry, not a hang; the
    ones that did not connect within ``within`` seconds are given up."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + within
    while len(held) < count and time.monotonic() < deadline:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code in (0, errno.EINPROGRESS):
            held.append(sock)
        else:  # EAGAIN: the unix socket's accept queue is full; let gosup catch up
            sock.close()
            time.sleep(0.002)
    return held


def started(g: Gosup) -> int:
    return len(g.history("crashy", "started"))


def test_a_flood_of_idle_connections_leaves_status_and_restarts_working(
    gosup_factory: Any, goapp: Path
) -> None:
    """15.5: 2,000 idle connections to the control socket and 2,000 to
    /metrics, gosup under ``ulimit -n 1024``: ``gosup status`` answers, the
    crash-looping program keeps being restarted (never FATAL, no "Too many
    open files"), and the refusals are logged per burst, not each."""
    port = free_port()
    g = gosup_factory(crashloop(goapp, port)).start()
    g.wait_event("started", "crashy")
    resource.prlimit(g.pid, resource.RLIMIT_NOFILE, (GOSUP_NOFILE, GOSUP_NOFILE))
    held: list[socket.socket] = []
    with own_nofile(2 * FLOOD + 256):
        try:
            sock_path = str(g.state_dir / "gosup.sock")
            held += open_idle(socket.AF_UNIX, sock_path, FLOOD, within=10.0)
            held += open_idle(socket.AF_INET, ("127.0.0.1", port), FLOOD, within=10.0)
            before = started(g)
            for _ in range(3):
                result = g.cli("status", "--json", timeout=30)
                assert result.returncode == 0, result.stderr
                assert json.loads(result.stdout)["programs"][0]["name"] == "crashy"
            # The program is still restarted, again and again.
            wait_for(lambda: started(g) >= before + 5, 30, "five more starts of crashy")
            # A scrape gets through. (Until gosup has accepted the flood still
            # in its listen backlog, a new connection is as idle as the flood's
            # and may be the one evicted: a scraper retries, so does this.)
            wait_for(lambda: b"gosup_program_up" in _scrape(port), 30, "a /metrics scrape")
        finally:
            for sock in held:
                sock.close()
    g.assert_alive()
    assert not g.history("crashy", "fatal")
    log = g.log()
    assert "Too many open files" not in log
    burst_lines = [line for line in log.splitlines() if "connections open" in line]
    assert 1 <= len(burst_lines) <= 4, burst_lines  # per burst and server, not per connection
    assert g.stop() == 0


# -- 15.6: parsers given untrusted input ---------------------------------------------


class _Served:
    """A tiny HTTP server (a thread) answering every GET with ``body``."""

    def __init__(self, body: bytes) -> None:
        served = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(served)))
                self.end_headers()
                self.wfile.write(served)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/debug/vars"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _status(g: Gosup, name: str) -> dict[str, Any]:
    result = g.cli("status", "--json", "--socket", str(g.state_dir / "gosup.sock"), name)
    assert result.returncode == 0, result.stderr
    entry: dict[str, Any] = json.loads(result.stdout)["programs"][0]
    return entry


def test_deeply_nested_expvar_is_a_scrape_error_shown_in_status(
    gosup_factory: Any, goapp: Path
) -> None:
    """15.6: an expvar answer nested 100,000 deep was an uncaught
    RecursionError: the program was never sampled and showed no error."""
    served = _Served(b'{"memstats": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    try:
        g = gosup_factory(f"""
            [programs.deep]
            command = ["{goapp}", "-mode", "serve"]
            start_seconds = "100ms"

            [programs.deep.limits]
            interval = "200ms"
            goroutines = 1000
            go_metrics = "{served.url}"
        """).start()
        g.running_pid("deep")
        entry = wait_for(
            lambda: (e := _status(g, "deep")).get("scrape_error") and e,
            20,
            "a scrape error in status",
        )
        assert "nest" in entry["scrape_error"], entry
        assert entry.get("rss_bytes"), entry  # the process is sampled all the same
        assert "RecursionError" not in g.log()
        assert g.stop() == 0
    finally:
        served.close()


def _cpu_seconds(code: str) -> float:
    """CPU time a fresh interpreter spends running ``code`` (a 60 s CPU cap)."""
    script = (
        "import resource, time\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (60, 60))\n"
        "t = time.process_time()\n" + code + "\nprint(time.process_time() - t)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return float(out.stdout.split()[-1])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("b'go_goroutines{\\n' * 250_000", id="unclosed-labels-per-line"),
        pytest.param("b'go_goroutines{' + b'a' * (4 << 20)", id="one-huge-line"),
        pytest.param("b'x 1\\n' * 1_000_000", id="a-million-lines"),
    ],
)
def test_prometheus_text_is_parsed_in_bounded_time(body: str) -> None:
    """15.6: Prometheus text of unclosed label sets took quadratic time on
    the event loop (5.5 s of CPU for 20,000 lines, 300 KB); now the work is
    linear in the (capped) answer and too many or too long lines are an error.
    CPU time, not wall time: a loaded machine does not make it fail."""
    code = (
        "from supervisor.health import gometrics\n"
        f"body = {body}\n"
        "try:\n    gometrics.parse_metrics(body)\nexcept gometrics.ScrapeError:\n    pass\n"
    )
    assert _cpu_seconds(code) < 5.0


def test_prometheus_caps_are_errors_that_say_so() -> None:
    lines = b"go_goroutines 3\n" + b"x 1\n" * (gometrics.MAX_LINES + 1)
    with pytest.raises(gometrics.ScrapeError, match="lines"):
        gometrics.parse_metrics(lines)
    long_line = b"go_goroutines 3\n# " + b"a" * gometrics.MAX_LINE + b"\n"
    with pytest.raises(gometrics.ScrapeError, match="line"):
        gometrics.parse_metrics(long_line)
    # A real page with labels still reads.
    page = b'go_goroutines{job="x"} 12\ngo_memstats_heap_inuse_bytes 4.5e+06\n'
    assert gometrics.parse_metrics(page) == {"goroutines": 12, "heap_inuse_bytes": 4_500_000}


DEEP_TOML = "[supervisor]\nx = " + "[" * 5000 + "]" * 5000 + "\n"


@pytest.mark.parametrize("command", ["check", "status", "history"])
def test_deeply_nested_toml_is_a_config_error_naming_the_file(tmp_path: Path, command: str) -> None:
    """15.6: a TOML nested 5,000 deep crashed check, status and reload with a traceback."""
    config = tmp_path / "app.toml"
    config.write_text(DEEP_TOML)
    args = [command, str(config)] if command == "check" else [command, "-c", str(config)]
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(config) in result.stderr and "nest" in result.stderr


def test_reload_of_a_deeply_nested_toml_is_refused_cleanly(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(f"""
        [programs.api]
        command = ["{goapp}", "-mode", "serve"]
        start_seconds = "100ms"
    """).start()
    pid = g.running_pid("api")
    g.config.write_text(DEEP_TOML)
    for how in ([], ["--socket", str(g.state_dir / "gosup.sock")]):  # the client reads it too
        result = g.cli("reload", *how)
        assert result.returncode == 2, result.stderr
        assert "nest" in result.stderr and "Traceback" not in result.stderr
    g.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: "nested deeper" in g.log().split("SIGHUP")[-1], 10, "the SIGHUP refusal")
    assert "Traceback" not in g.log()
    assert _status(g, "api")["pid"] == pid
    assert g.stop() == 0


# -- 15.7: nobody reads gosup's stderr or stdout ----------------------------------------


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe whose read end is ``fd``."""
    import termios

    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def _blocked_writing_a_pipe(pid: int, threads: int = 1) -> bool:
    """``threads`` threads of ``pid`` wait in the kernel for a pipe's reader."""
    blocked = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            blocked += (task / "wchan").read_text().endswith("pipe_write")
    return blocked >= threads


def _lag_count(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("gosup_event_loop_lag_seconds_count"):
            return float(line.split()[-1])
    raise AssertionError("no gosup_event_loop_lag_seconds_count on /metrics")


def test_a_stalled_reader_of_gosups_output_never_stalls_supervision(
    gosup_factory: Any, goapp: Path
) -> None:
    """15.7: gosup's stderr and stdout are pipes nobody reads (a paused
    ``| less``, a journald backlog). Once the pipe is full, signals, restarts,
    the control socket, /metrics and the sd_notify watchdog keep working, and
    once the reader is back the log goes on. Before: the first log line that
    did not fit stopped all of it. (How the queue drops and counts:
    tests/test_output.py, the DroppingWriter's own test.)"""
    from test_systemd import NotifyListener

    listener = NotifyListener()
    port = free_port()
    g = gosup_factory(crashloop(goapp, port, say="x" * 500))
    err_r, err_w = os.pipe()
    out_r, out_w = os.pipe()
    fcntl.fcntl(err_w, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: full after a few lines
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    env = dict(os.environ, NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
    try:
        g.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", str(g.config), "-v", "--echo"],
            cwd=g.dir,
            stdout=out_w,
            stderr=err_w,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(err_w)
        os.close(out_w)
        err_w = out_w = -1
        # Both pipes fill up: the log on stderr, the programs' echo on stdout.
        wait_for(lambda: _blocked_writing_a_pipe(g.pid, 2), 30, "both pipes to fill up")
        full_at = len(listener.lines())
        before = started(g)
        # The pipe stays full: everything below runs while nobody reads it.
        for _ in range(3):
            result = g.cli("status", "--json", timeout=30)
            assert result.returncode == 0, result.stderr
        wait_for(lambda: started(g) >= before + 3, 30, "three more restarts")
        wait_for(lambda: listener.lines()[full_at:].count("WATCHDOG=1") >= 5, 30, "watchdog pings")
        assert _lag_count(port) > 0
        assert _blocked_writing_a_pipe(g.pid, 2)  # still full: nothing above needed a reader
        # The reader comes back: the log goes on (what waited in the queue, then new lines).
        seen = bytearray()
        after = started(g)

        def drained() -> bool:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(err_r, 65536):
                    seen.extend(chunk)
            return f"started pid {g.history('crashy', 'started')[after]['pid']}".encode() in seen

        os.set_blocking(err_r, False)
        wait_for(lambda: started(g) > after, 30, "one more start")
        wait_for(drained, 30, "the log of a start after the reader came back")
        # Signals: SIGTERM ends gosup cleanly, whoever reads its output or not.
        assert g.stop() == 0
    finally:
        for fd in (err_r, err_w, out_r, out_w):  # (-1: closed already)
            if fd >= 0:
                os.close(fd)
        listener.close()


def test_connections_close_the_idle_first_and_after_the_idle_timeout() -> None:
    """service/conncap.py on a real Unix socket server: with the cap reached,
    a newcomer pushes the longest idle connection out (a busy one never is);
    an idle one is closed after idle_timeout; bursts are counted."""
    import asyncio
    import tempfile

    from supervisor.service.conncap import Connections

    async def main(path: str) -> None:
        conns = Connections("test", limit=2, idle_timeout=0.5)
        served: list[str] = []
        progress = asyncio.Event()  # set when a connection is admitted or a line served

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if not conns.admit(writer.transport.abort):
                writer.write(b"refused\n")
                writer.close()
                return
            progress.set()
            try:
                while True:
                    async with conns.waiting():
                        line = await reader.readline()
                    if not line:
                        return
                    conns.busy()
                    served.append(line.decode().strip())
                    progress.set()
                    if line.startswith(b"slow"):
                        await asyncio.sleep(1.0)  # busy: never pushed out meanwhile
                    writer.write(b"ok\n")
                    await writer.drain()
            except (TimeoutError, ConnectionError):
                pass
            finally:
                conns.leave()
                writer.close()

        async def until(condition: Any) -> None:
            async with asyncio.timeout(5):  # a deadline, not a guess at how long it takes
                while not condition():
                    progress.clear()
                    await progress.wait()

        server = await asyncio.start_unix_server(serve, path)
        try:
            first = await asyncio.open_unix_connection(path)
            second = await asyncio.open_unix_connection(path)
            await until(lambda: len(conns) == 2)  # both admitted
            third = await asyncio.open_unix_connection(path)  # pushes `first` out
            assert await first[0].read() == b""
            third[1].write(b"hello\n")
            assert await third[0].readline() == b"ok\n"
            # Busy ones stay: second and third busy, a fourth is refused.
            second[1].write(b"slow\n")
            third[1].write(b"slow\n")
            await until(lambda: served.count("slow") == 2)  # both busy
            fourth = await asyncio.open_unix_connection(path)
            assert await fourth[0].read() == b"refused\n"
            assert await second[0].readline() == b"ok\n"
            # Idle longer than idle_timeout: closed by the server.
            assert await asyncio.wait_for(second[0].read(), 5) == b""
            assert conns.log.total == 2
            for _, writer in (first, second, third, fourth):
                writer.close()
        finally:
            conns.close_all()
            server.close()
            await server.wait_closed()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(os.path.join(tmp, "s.sock")))


@pytest.mark.parametrize(
    ("listen", "warned"),
    [
        ("127.0.0.1:9109", False),
        ("[::1]:9109", False),
        ("localhost:9109", False),
        ("0.0.0.0:9109", True),
        ("[::]:9109", True),
        ("192.0.2.7:9109", True),
    ],
)
def test_check_warns_when_metrics_listen_is_not_loopback(
    tmp_path: Path, listen: str, warned: bool
) -> None:
    config = tmp_path / "app.toml"
    config.write_text(f'[supervisor]\nmetrics_listen = "{listen}"\n')
    result = gosup_check(config)
    assert result.returncode == 0, result.stderr
    warning = f"warning: {config}: supervisor.metrics_listen: {listen} is not a loopback address"
    assert (warning in result.stderr) is warned, result.stderr


def _scrape(port: int) -> bytes:
    """/metrics, or b"" when the connection was refused, reset or timed out."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            body: bytes = r.read()
            return body
    except OSError:
        return b""
