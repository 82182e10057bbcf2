"""The goapp fixture's HTTP side, run directly (not through gosup): readiness,
liveness, a hung server, a failed start, the reload verdict and sockets
inherited with systemd's protocol (tests/fixtures/goapp/serve.go, reload.go).

These flags are what the probe, verdict and zero-downtime tests stand on, so
each one is proved here on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import pid_alive, wait_for

# Execs argv[2:] with fds argv[1] (comma-separated) as 3, 4, ... and
# LISTEN_PID set to its own pid, which exec keeps: the child's pid, as the
# protocol wants (and as gosup will do between fork and exec).
LISTEN_WRAPPER = """\
import os, sys
fds = [int(f) for f in sys.argv[1].split(",")]
for target, fd in enumerate(fds, start=3):
    os.dup2(fd, target)
for fd in fds:
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class Goapp:
    """One goapp process started directly, its output in files."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.proc, self.out, self.err = proc, out, err

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def wait_line(self, line: str, timeout: float = 10.0) -> None:
        wait_for(lambda: line in self.stdout().splitlines(), timeout, f"{line!r} on stdout")

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)


@contextlib.contextmanager
def started(
    argv: Sequence[object],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> Iterator[Goapp]:
    n = len(list(tmp_path.glob("out-*")))
    out, err = tmp_path / f"out-{n}", tmp_path / f"err-{n}"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            env=env,
            pass_fds=pass_fds,
        )
    try:
        yield Goapp(proc, out, err)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def with_sockets(argv: Sequence[object], socks: Sequence[socket.socket]) -> list[str]:
    """argv run through LISTEN_WRAPPER, the sockets' fds to pass (see ``high_fds``)."""
    return [sys.executable, "-c", LISTEN_WRAPPER, ",".join(str(s.fileno()) for s in socks)] + [
        str(a) for a in argv
    ]


@contextlib.contextmanager
def high_dups(socks: Sequence[socket.socket]) -> Iterator[list[socket.socket]]:
    """Copies of the sockets at fds >= 100, so none sits where it is dup2'ed to."""
    dups = [
        socket.socket(fileno=fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, 100)) for s in socks
    ]
    try:
        yield dups
    finally:
        for d in dups:
            d.close()


def tcp_listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def get(addr: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def get_unix(path: Path, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def times_out(addr: str, path: str) -> bool:
    try:
        get(addr, path, timeout=0.3)
    except TimeoutError:
        return True
    return False


def sample(addr: str, prefix: str) -> str:
    """The value of the first /metrics sample whose line starts with ``prefix``."""
    status, body = get(addr, "/metrics")
    assert status == 200
    for line in body.splitlines():
        if line.startswith(prefix + " ") or line.startswith(prefix + "{"):
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no {prefix} in /metrics:\n{body}")


def addr_of(tmp_path: Path) -> str:
    f = tmp_path / "addr"
    return str(wait_for(lambda: f.exists() and f.read_text().strip(), 10, "the address file"))


def http_args(tmp_path: Path) -> list[str]:
    return ["-http", "127.0.0.1:0", "-addr-file", str(tmp_path / "addr")]


# -- readiness, liveness, identity --------------------------------------------------


def test_endpoints_show_name_pid_and_version(goapp: Path, tmp_path: Path) -> None:
    argv = [goapp, *http_args(tmp_path), "-name", "web", "-version", "v1.2.3"]
    with started(argv, tmp_path) as app:
        addr = addr_of(tmp_path)
        assert get(addr, "/") == (200, f"hello from web pid {app.pid} version v1.2.3\n")
        assert get(addr, "/healthz") == (200, "ok\n")
        assert get(addr, "/readyz") == (200, "ready\n")
        assert get(addr, "/nope")[0] == 404
        assert sample(addr, 'goapp_build_info{name="web",version="v1.2.3"}') == "1"
        assert sample(addr, "goapp_ready") == "1"
        assert sample(addr, "go_goroutines")  # the existing metrics are still there
        assert "goapp_config_" not in get(addr, "/metrics")[1]  # no -config


def test_ready_delay(goapp: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with started([goapp, *http_args(tmp_path), "-ready-delay", "1500ms"], tmp_path):
        addr = addr_of(tmp_path)
        seen = []

        def ready() -> bool:
            status, body = get(addr, "/readyz")
            seen.append((status, body))
            return status == 200

        wait_for(ready, 10, "/readyz to answer 200")
        assert time.monotonic() - t0 >= 1.5
        assert seen[0] == (503, "not ready\n")
        assert get(addr, "/healthz")[0] == 200
        assert sample(addr, "goapp_ready") == "1"


def test_never_ready_but_live(goapp: Path, tmp_path: Path) -> None:
    with started([goapp, *http_args(tmp_path), "-never-ready"], tmp_path):
        addr = addr_of(tmp_path)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert get(addr, "/readyz")[0] == 503
            assert get(addr, "/healthz")[0] == 200
            time.sleep(0.05)
        assert sample(addr, "goapp_ready") == "0"


def test_hang_after_deadlocks_handlers_but_not_pprof(goapp: Path, tmp_path: Path) -> None:
    argv = [goapp, *http_args(tmp_path), "-hang-after", "300ms", "-shutdown-timeout", "300ms"]
    with started(argv, tmp_path) as app:
        addr = addr_of(tmp_path)
        assert get(addr, "/healthz")[0] == 200
        wait_for(lambda: times_out(addr, "/healthz"), 10, "/healthz to hang")
        app.wait_line("hang: HTTP handlers deadlock from now on")
        for path in ("/", "/readyz", "/metrics"):
            assert times_out(addr, path), path
        status, dump = get(addr, "/debug/pprof/goroutine?debug=2")
        assert status == 200
        assert "main.hangingHandler" in dump and "sync.(*Mutex).Lock" in dump
        assert pid_alive(app.pid)
        # Shutdown waits for the hung requests in vain, then gives up.
        app.proc.send_signal(signal.SIGTERM)
        assert app.wait_exit() == 1
        assert "requests in flight" in app.stderr()


def test_fail_start(goapp: Path, tmp_path: Path) -> None:
    msg = "listen tcp :80: bind: permission denied"
    argv = [goapp, *http_args(tmp_path), "-fail-start", msg, "-startfile", tmp_path / "starts"]
    with started(argv, tmp_path) as app:
        assert app.wait_exit() == 1
        assert app.stderr() == msg + "\n"
        assert (tmp_path / "starts").read_text().startswith(f"{app.pid} ")
        assert not (tmp_path / "addr").exists()


# -- the reload verdict ---------------------------------------------------------------


def test_refused_reload_keeps_the_old_config(goapp: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "app.conf"
    cfg.write_text("version 1\n")
    argv = [goapp, *http_args(tmp_path), "-config", cfg, "-report-signals"]
    with started(argv, tmp_path) as app:
        addr = addr_of(tmp_path)
        assert sample(addr, "goapp_config_last_reload_successful") == "1"
        assert sample(addr, "goapp_config_version") == "1"
        assert int(sample(addr, "goapp_config_last_reload_success_timestamp_seconds")) > 0

        cfg.write_text("version 2\nrefuse\n")
        app.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sample(addr, "goapp_config_last_reload_successful") == "0", 10, "0")
        assert sample(addr, "goapp_config_version") == "1"  # still the old one
        assert "config reload refused, keeping the previous one: refuse" in app.stderr()
        assert pid_alive(app.pid)

        cfg.write_text("version 3\n")
        app.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: sample(addr, "goapp_config_last_reload_successful") == "1", 10, "1")
        assert sample(addr, "goapp_config_version") == "3"


def test_reload_command_reports_the_verdict(goapp: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "app.conf"
    cfg.write_text("version 1\n")

    def reload(pid: int) -> subprocess.CompletedProcess[str]:
        argv = [str(goapp), "-reload", str(pid)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=20)

    with started([goapp, *http_args(tmp_path), "-config", cfg], tmp_path) as app:
        addr = addr_of(tmp_path)
        cfg.write_text("version 2\n")
        r = reload(app.pid)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("reload ok sha256=")
        assert sample(addr, "goapp_config_version") == "2"

        cfg.write_text("version 3\nrefuse\n")
        r = reload(app.pid)
        assert r.returncode == 1
        assert "refused" in r.stderr
        assert sample(addr, "goapp_config_last_reload_successful") == "0"
        assert sample(addr, "goapp_config_version") == "2"

        # crash is taken on reload; it only breaks the next start
        cfg.write_text("version 4\ncrash\n")
        assert reload(app.pid).returncode == 0
        assert sample(addr, "goapp_config_version") == "4"

        # poison makes the program exit while reloading: no verdict is a failure
        cfg.write_text("version 5\npoison\n")
        r = reload(app.pid)
        assert r.returncode == 1 and "no verdict" in r.stderr
        assert app.wait_exit() == 3

    r = reload(app.pid)  # nobody there
    assert r.returncode == 2 and "no goapp -config" in r.stderr


@pytest.mark.parametrize("marker", ["refuse", "crash"])
def test_a_config_that_passes_the_validator_can_still_fail_at_start(
    goapp: Path, tmp_path: Path, marker: str
) -> None:
    cfg = tmp_path / "app.conf"
    cfg.write_text(f"version 9\n{marker}\n")
    check = subprocess.run([goapp, "-check-config", cfg], capture_output=True, timeout=20)
    assert check.returncode == 0
    with started([goapp, "-config", cfg], tmp_path) as app:
        assert app.wait_exit() == 1
        assert app.stdout().splitlines()[-1].startswith("config: sha256=")
    cfg.write_text("poison\n")
    assert subprocess.run([goapp, "-check-config", cfg], capture_output=True).returncode == 1


# -- inherited sockets ------------------------------------------------------------------


def test_serves_on_inherited_tcp_and_unix_sockets(goapp: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    env = dict(os.environ, LISTEN_FDS="2", LISTEN_FDNAMES="web:admin")
    argv = [goapp, "-name", "sock", "-env-file", tmp_path / "env", "-addr-file", tmp_path / "addr"]
    with tcp_listener() as tcp, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(path))
        unix.listen(16)
        with (
            high_dups([tcp, unix]) as fds,
            started(with_sockets(argv, fds), tmp_path, env, [d.fileno() for d in fds]) as app,
        ):
            tcp_addr = f"127.0.0.1:{tcp.getsockname()[1]}"
            app.wait_line("ready")
            lines = app.stdout().splitlines()
            assert f"inherited: fd=3 name=web addr={tcp_addr}" in lines
            assert f"inherited: fd=4 name=admin addr={path}" in lines
            env_lines = (tmp_path / "env").read_text().splitlines()
            assert f"LISTEN_PID={app.pid}" in env_lines and "LISTEN_FDS=2" in env_lines
            assert addr_of(tmp_path) == tcp_addr
            hello = f"hello from sock pid {app.pid}\n"
            assert get(tcp_addr, "/") == (200, hello)
            assert get_unix(path).endswith("\r\n\r\n" + hello)
            # the wrapper handed over fds 3 and 4 only, not its own copies
            assert all(int(fd) < 100 for fd in os.listdir(f"/proc/{app.pid}/fd"))


def test_listen_pid_of_another_process_is_ignored(goapp: Path, tmp_path: Path) -> None:
    with tcp_listener() as tcp, high_dups([tcp]) as fds:
        env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID="1")
        argv = [goapp, "-addr-file", tmp_path / "addr"]
        with started(argv, tmp_path, env, [fds[0].fileno()]) as app:
            app.wait_line("ready")
            assert f"inherited: ignored LISTEN_FDS=1 LISTEN_PID=1 (our pid is {app.pid})" in (
                app.stdout().splitlines()
            )
            assert not (tmp_path / "addr").exists()


def test_sigterm_finishes_in_flight_requests_and_the_backlog_waits(
    goapp: Path, tmp_path: Path
) -> None:
    """The zero-downtime contract: the old process answers what it accepted,
    and a connection made while no process serves waits for the next one."""
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="web")
    argv = [goapp, "-handler-delay", "1s", "-addr-file", tmp_path / "addr"]
    with tcp_listener() as tcp, high_dups([tcp]) as fds, ThreadPoolExecutor(1) as pool:
        addr = f"127.0.0.1:{tcp.getsockname()[1]}"
        cmd = with_sockets(argv, fds)
        with started(cmd, tmp_path, env, [fds[0].fileno()]) as old:
            old.wait_line("ready")
            slow = pool.submit(get, addr, "/")
            wait_for(lambda: sample(addr, "goapp_http_requests_in_flight") == "1", 10, "in flight")
            old.proc.send_signal(signal.SIGTERM)
            assert slow.result(timeout=10) == (200, f"hello from goapp pid {old.pid}\n")
            assert old.wait_exit() == 0
        # Nobody serves now: the kernel completes the connection and queues it.
        with socket.create_connection(("127.0.0.1", tcp.getsockname()[1]), timeout=20) as c:
            c.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            with started(cmd, tmp_path, env, [fds[0].fileno()]) as new:
                with c.makefile("rb") as reply:
                    answer = reply.read().decode()
                assert answer.endswith(f"\r\n\r\nhello from goapp pid {new.pid}\n")
