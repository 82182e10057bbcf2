"""Sockets gosup holds for its programs (``sockets = [...]``, issue 14).

A real gosup runs the goapp fixture, which serves HTTP on the sockets it
inherits with systemd's protocol (tests/fixtures/goapp/serve.go). The tests
check the protocol variables (LISTEN_PID is the program's own pid), that no
socket reaches a process that did not ask for one, that a crash refuses no
connection (the kernel queues them in the backlog gosup keeps open), and
that binding errors and socket changes are handled at start and at reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import stat
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Gosup, free_port, pid_alive, wait_for

GosupFactory = Callable[..., Gosup]


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def served_by(body: str) -> int:
    """The pid in goapp's "hello from NAME pid N" answer."""
    words = body.split()
    return int(words[words.index("pid") + 1])


class ClientLoop:
    """Requests one after another on new connections, in a thread, until stopped;
    counts each outcome: ``ok``, ``refused`` (ECONNREFUSED), or the error's name."""

    def __init__(self, port: int, path: str = "/") -> None:
        self.port, self.path = port, path
        self.outcomes: Counter[str] = Counter()
        self.pids: set[int] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = get(self.port, self.path, timeout=15.0)
            except ConnectionRefusedError:
                self.outcomes["refused"] += 1
            except OSError as exc:
                self.outcomes[type(exc).__name__] += 1
                self.errors.append(repr(exc))
            except http.client.HTTPException as exc:
                self.outcomes[type(exc).__name__] += 1
                self.errors.append(repr(exc))
            else:
                self.outcomes["ok" if status == 200 else f"http {status}"] += 1
                if status == 200 and "pid" in body:
                    self.pids.add(served_by(body))

    def wait_answers(self, n: int, timeout: float = 20.0) -> None:
        start = self.outcomes["ok"]
        wait_for(lambda: self.outcomes["ok"] >= start + n, timeout, f"{n} answers")

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def app_toml(goapp: Path, sockets: list[str], extra_args: str = "", more: str = "") -> str:
    quoted = ", ".join(f'"{s}"' for s in sockets)
    return f"""
        [programs.api]
        command = ["{goapp}", "-name", "api"{extra_args}]
        sockets = [{quoted}]
        start_seconds = "200ms"
        stop_timeout = "5s"
        [programs.api.backoff]
        initial = "100ms"
        max = "200ms"
        give_up_after = 0
        {more}
    """


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key] = value
    return env


def socket_fds(pid: int) -> dict[int, str]:
    """The process's fds that are sockets: fd -> link (socket:[inode])."""
    out = {}
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:"):
                    out[int(fd)] = link
    return out


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:port (from /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want and parts[3] == "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{parts[9]}]")
    return inodes


# -- the protocol ------------------------------------------------------------------


def test_protocol_variables_name_the_programs_own_pid(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    port = free_port()
    g = gosup_factory(
        app_toml(goapp, [f"tcp://127.0.0.1:{port}", "unix:run/api.sock"], ', "-env-file", "env"')
    )
    (g.dir / "run").mkdir()
    g.start()
    pid = g.running_pid("api")
    env = wait_for(lambda: (g.dir / "env").exists() and read_env(g.dir / "env"), 10, "env file")
    # What the program saw before it took the sockets (the fixture unsets them after).
    assert env["LISTEN_PID"] == str(pid)
    assert env["LISTEN_FDS"] == "2"
    assert env["LISTEN_FDNAMES"] == "api:api"
    out = (g.log_dir / "api.stdout.log").read_text
    wait_for(lambda: f"inherited: fd=3 name=api addr=127.0.0.1:{port}" in out(), 10, "fd 3")
    sock_path = g.dir / "run" / "api.sock"
    assert f"inherited: fd=4 name=api addr={sock_path}" in out()
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
    status, body = get(port)
    assert status == 200 and served_by(body) == pid
    # The process serves on gosup's very socket: its listener is the one gosup holds.
    assert listening_inodes(port) & set(socket_fds(g.pid).values())
    assert g.stop() == 0
    assert not sock_path.exists(), "gosup removes its unix socket when it ends"


def test_no_socket_reaches_processes_that_did_not_ask(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    """Programs without sockets, validators and exec probes get no socket fd."""
    port = free_port()
    fds_of = 'ls -l /proc/$$/fd > "$0"; exit 0'
    config = app_toml(
        goapp,
        [f"tcp://127.0.0.1:{port}"],
        more=f"""
        [programs.api.ready]
        exec = ["sh", "-c", '{fds_of}', "{{probe_out}}"]
        [[programs.api.config_files]]
        path = "api.conf"
        validate = ["sh", "-c", '{fds_of}', "{{validator_out}}", "{{{{file}}}}"]
        on_change = "none"
        [programs.plain]
        command = ["{goapp}", "-name", "plain"]
        start_seconds = "200ms"
        """,
    )
    g = gosup_factory("")
    probe_out, validator_out = g.dir / "probe-fds", g.dir / "validator-fds"
    g.config.write_text(
        textwrap.dedent(config).format(probe_out=probe_out, validator_out=validator_out)
    )
    (g.dir / "api.conf").write_text("version 1\n")
    g.start()
    api = g.running_pid("api")
    plain = g.running_pid("plain")
    # (goapp moves fd 3 elsewhere: net.FileListener dups it, then it closes 3)
    assert listening_inodes(port) & set(socket_fds(api).values()), "the program has its socket"
    assert socket_fds(plain) == {}, "a program without sockets has none"
    probe = probe_out.read_text()
    assert "socket:" not in probe, probe
    staged = g.cli("stage", str(_staged(g.dir, "version 2\n")), "api.conf", "--no-wait")
    assert staged.returncode == 0, staged
    wait_for(validator_out.exists, 15, "the validator ran")
    validator = validator_out.read_text()
    assert "socket:" not in validator, validator
    assert g.stop() == 0


def _staged(directory: Path, text: str) -> Path:
    new = directory / "new.conf"
    new.write_text(text)
    return new


# -- crashes refuse nothing ------------------------------------------------------------


def test_crash_restarts_refuse_no_connection(goapp: Path, gosup_factory: GosupFactory) -> None:
    port = free_port()
    g = gosup_factory(app_toml(goapp, [f"tcp://127.0.0.1:{port}"]))
    g.start()
    first = g.running_pid("api")
    killed = [first]
    with ClientLoop(port) as client:
        client.wait_answers(5)
        for n in range(3):
            os.kill(killed[-1], signal.SIGKILL)
            recs = g.wait_event("running", "api", count=n + 2, timeout=30)
            killed.append(int(recs[-1]["pid"]))
            client.wait_answers(5)
    assert client.outcomes["refused"] == 0, client.outcomes
    # A request that a killed process had accepted may be cut off (documented);
    # none may be refused, and the replacements serve.
    assert client.pids >= set(killed[1:]), (client.pids, killed)
    assert g.stop() == 0


def test_without_sockets_a_crash_refuses_connections(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    """The same crash loop with the program binding its own port: the figure
    the test above improves on (refusals while no process listens)."""
    port = free_port()
    config = app_toml(goapp, [], f', "-http", "127.0.0.1:{port}"').replace("sockets = []", "")
    g = gosup_factory(
        config.replace('max = "200ms"', 'initial = "300ms"').replace(
            'initial = "100ms"', 'max = "300ms"'
        )
    )
    g.start()
    pid = g.running_pid("api")
    with ClientLoop(port) as client:
        client.wait_answers(5)
        os.kill(pid, signal.SIGKILL)
        g.wait_event("running", "api", count=2, timeout=30)
        client.wait_answers(5)
    assert client.outcomes["refused"] > 0, client.outcomes
    assert g.stop() == 0


# -- binding errors and reloads -----------------------------------------------------------


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def test_a_port_that_cannot_be_bound_is_a_config_error_at_start(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    with taken_port() as port:
        g = gosup_factory(app_toml(goapp, [f"tcp://127.0.0.1:{port}"]))
        g.start()
        assert g.proc is not None
        assert g.proc.wait(30) == 2
    err = g.log()
    assert f"programs.api.sockets[0]: cannot listen on tcp://127.0.0.1:{port}" in err, err
    assert "Address already in use" in err
    assert not g.history("api", "started")


def test_reload_rebinds_changed_sockets_and_refuses_unbindable_ones(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    old_port, new_port = free_port(), free_port()
    g = gosup_factory(app_toml(goapp, [f"tcp://127.0.0.1:{old_port}"]))
    g.start()
    pid = g.running_pid("api")
    assert served_by(get(old_port)[1]) == pid

    # A port that cannot be bound: the reload is refused, nothing changed.
    with taken_port() as busy:
        g.config.write_text(
            g.config.read_text().replace(f":{old_port}", f":{busy}") + "\n[programs.other]\n"
            f'command = ["{goapp}"]\n'
        )
        result = g.cli("reload", "-c", str(g.config))
    assert result.returncode == 2, result  # a config error
    assert f"programs.api.sockets[0]: cannot listen on tcp://127.0.0.1:{busy}" in result.stderr
    assert served_by(get(old_port)[1]) == pid, "the old socket and process keep serving"
    assert "other" not in g.cli("status", "--json", "-c", str(g.config)).stdout

    # A new port: the program restarts on it, the old port is closed.
    g.config.write_text(app_toml(goapp, [f"tcp://127.0.0.1:{new_port}"]))
    result = g.cli("reload", "-c", str(g.config))
    assert result.returncode == 0, result
    new_pid = _next_running(g, pid)
    assert served_by(get(new_port)[1]) == new_pid
    with pytest.raises(ConnectionRefusedError):
        get(old_port, timeout=2)
    assert not pid_alive(pid)
    assert g.stop() == 0


def _next_running(g: Gosup, after: int) -> int:
    recs = g.wait_event("running", "api", where=lambda r: r["pid"] != after)
    return int(recs[-1]["pid"])


def test_sockets_are_kept_across_restarts(goapp: Path, gosup_factory: GosupFactory) -> None:
    """An operator's restart and a crash: the listening socket stays the same one."""
    port = free_port()
    g = gosup_factory(app_toml(goapp, [f"tcp://127.0.0.1:{port}"]))
    g.start()
    pid = g.running_pid("api")
    before = listening_inodes(port)
    assert g.cli("restart", "api", "-c", str(g.config)).returncode == 0
    second = _next_running(g, pid)
    assert served_by(get(port)[1]) == second
    assert listening_inodes(port) == before
    assert g.stop() == 0


@pytest.mark.parametrize("wrapper", ["bash", "python"])
def test_the_wrapper_moves_fds_and_sets_the_pid(
    goapp: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrapper: str
) -> None:
    """spawn.launch directly, with bash and with the Python fallback (no bash):
    the sockets at 3 and 4 in their order, LISTEN_PID the program's pid."""
    from supervisor.config import ProgramSpec
    from supervisor.core import spawn

    if wrapper == "python":
        monkeypatch.setattr(spawn, "_bash", lambda: None)
    env_file = tmp_path / "env"
    spec = ProgramSpec(
        name="api",
        command=(str(goapp), "-name", "api", "-env-file", str(env_file)),
        directory=tmp_path,
    )
    a, b = socket.socket(), socket.socket()
    for s in (a, b):
        s.bind(("127.0.0.1", 0))
        s.listen(8)

    async def run() -> tuple[int, str, dict[str, str]]:
        child, _ = await spawn.launch(spec, {}, [a, b], "web")
        try:
            env = wait_for(lambda: env_file.exists() and read_env(env_file), 10, "env")
            out = b""
            while b"inherited: fd=4" not in out:
                out += await asyncio.wait_for(asyncio.to_thread(child.stdout.read, 65536), 10)
            return child.pid, out.decode(), env
        finally:
            child.signal_group(signal.SIGKILL)
            await child.exited
            child.stdout.close()
            child.stderr.close()

    ports = [s.getsockname()[1] for s in (a, b)]
    try:
        pid, out, env = asyncio.run(run())
    finally:
        a.close()
        b.close()
    assert env["LISTEN_PID"] == str(pid) and env["LISTEN_FDS"] == "2", env
    assert env["LISTEN_FDNAMES"] == "web:web"
    assert f"inherited: fd=3 name=web addr=127.0.0.1:{ports[0]}" in out
    assert f"inherited: fd=4 name=web addr=127.0.0.1:{ports[1]}" in out
