"""The control socket and the client commands, against a real `gosup run`.

Every test drives gosup the way an operator does: the `gosup` CLI in a
subprocess (or raw bytes on the socket for the protocol's bad-input cases),
real Go children from tests/fixtures/goapp, real signals and files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, Gosup, pid_alive, wait_for

from supervisor.cli import status as status_cli

Factory = Callable[..., Gosup]


# -- helpers ------------------------------------------------------------------------


def prog(goapp: Path, name: str, *args: str, **keys: str) -> str:
    """A [programs.NAME] table running goapp; keys are TOML value literals."""
    argv = json.dumps([str(goapp), "-name", name, *args])
    keys = {"start_seconds": '"200ms"', "stop_timeout": '"5s"'} | keys
    lines = [f"[programs.{name}]", f"command = {argv}"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n\n"


def run(g: Gosup, *args: str) -> subprocess.CompletedProcess[str]:
    return g.cli(*args, timeout=60)


def status(g: Gosup, *names: str) -> dict[str, dict[str, Any]]:
    r = run(g, "status", "--json", *names)
    assert r.returncode == 0, r.stderr
    return {p["name"]: p for p in json.loads(r.stdout)["programs"]}


def wait_state(g: Gosup, name: str, state: str, timeout: float = 20.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        g.assert_alive()
        entry = status(g).get(name)  # absent while gosup is still adding its programs
        return entry if entry is not None and entry["state"] == state else None

    result: dict[str, Any] = wait_for(reached, timeout, f"{name} {state}")
    return result


def started(g: Gosup) -> Gosup:
    """Start gosup and wait until its control socket answers."""
    g.start()

    def answers() -> bool:
        g.assert_alive()
        return run(g, "status").returncode == 0

    wait_for(answers, 20, "gosup's control socket")
    return g


def raw(path: Path, data: bytes, *, half_close: bool = True) -> list[dict[str, Any]]:
    """Send raw bytes on the control socket; every reply line until gosup closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def sock_path(g: Gosup) -> Path:
    return g.state_dir / "gosup.sock"


# -- status, start, stop, restart ------------------------------------------------------


def test_status_shows_each_state(gosup_factory: Factory, goapp: Path) -> None:
    text = (
        prog(goapp, "up")
        + prog(goapp, "idle", autostart="false")
        + prog(goapp, "slow", start_seconds='"60s"')
        + prog(goapp, "done", "-mode", "exit", restart='"never"')
        + prog(goapp, "waits", "-mode", "exit", "-code", "1", backoff='{ initial = "60s" }')
        + prog(goapp, "dead", "-mode", "exit", "-code", "1", backoff="{ give_up_after = 1 }")
        # -report-signals: without it the fixture's Notify() catches SIGTERM anyway
        + prog(goapp, "hangs", "-ignore-term", "-report-signals", stop_timeout='"5s"')
    )
    g = started(gosup_factory(text))
    expected = {
        "up": "RUNNING",
        "idle": "STOPPED",
        "slow": "STARTING",
        "done": "EXITED",
        "waits": "BACKOFF",
        "dead": "FATAL",
        "hangs": "RUNNING",
    }
    for name, state in expected.items():
        wait_state(g, name, state)
    assert stat.S_IMODE(os.stat(sock_path(g)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(g.state_dir).st_mode) == 0o700

    # The table: a header and one row per program with its state and pid.
    table = run(g, "status").stdout.splitlines()
    assert table[0].split()[:5] == ["NAME", "STATE", "PID", "UPTIME", "RESTARTS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert {name: row[1] for name, row in rows.items()} == expected
    up = status(g)["up"]
    assert rows["up"][2] == str(up["pid"])
    assert table[list(expected).index("dead") + 1].endswith("exit 1")
    # --json has the documented shape, NAME... selects.
    assert set(status(g, "up", "idle")) == {"up", "idle"}
    for key in ("name", "state", "pid", "uptime_s", "restarts", "last_exit", "rss_bytes"):
        assert key in up
    assert run(g, "status", "nosuch").returncode == 1

    # A stop under way shows STOPPING; a second stop is answered, not raced.
    hangs_pid = status(g)["hangs"]["pid"]
    with subprocess.Popen(
        [sys.executable, "-m", "supervisor", "stop", "hangs"],
        cwd=g.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as first:
        try:
            wait_state(g, "hangs", "STOPPING")
            second = run(g, "stop", "hangs")
            assert second.returncode == 1
            assert "already stopping" in second.stderr
        finally:
            out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert "hangs stopped" in out
    assert not pid_alive(hangs_pid)
    stopped = g.wait_event("stopped", "hangs")
    assert stopped[-1]["killed"] is True


def test_restart_stop_and_start(gosup_factory: Factory, goapp: Path) -> None:
    g = started(gosup_factory(prog(goapp, "a") + prog(goapp, "b")))
    wait_state(g, "a", "RUNNING")
    wait_state(g, "b", "RUNNING")
    before = {n: p["pid"] for n, p in status(g).items()}

    r = run(g, "restart", "a", "b")
    assert r.returncode == 0, r.stderr
    after = {n: p["pid"] for n, p in status(g).items()}
    assert all(after[n] != before[n] and after[n] is not None for n in before)
    assert not any(pid_alive(pid) for pid in before.values())
    assert sorted(r.stdout.splitlines()) == [
        f"a running (pid {after['a']})",
        f"b running (pid {after['b']})",
    ]
    assert g.history("a", "restart_requested")[-1]["reason"] == "operator"

    # One unknown name: refused as a whole, nothing restarted.
    r = run(g, "restart", "a", "nosuch")
    assert r.returncode == 1
    assert "unknown program 'nosuch'" in r.stderr
    assert status(g)["a"]["pid"] == after["a"]

    r = run(g, "stop", "all")
    assert r.returncode == 0, r.stderr
    assert {p["state"] for p in status(g).values()} == {"STOPPED"}
    assert not any(pid_alive(pid) for pid in after.values())
    assert run(g, "stop", "a").stdout.strip() == "a already stopped"

    r = run(g, "start", "a")
    assert r.returncode == 0, r.stderr
    entry = status(g)["a"]
    assert entry["state"] == "RUNNING"
    assert pid_alive(entry["pid"])
    assert status(g)["b"]["state"] == "STOPPED"

    r = run(g, "restart", "all")
    assert r.returncode == 0, r.stderr
    assert {p["state"] for p in status(g).values()} == {"RUNNING"}

    # The history over the socket: the newest records, oldest first.
    [reply] = raw(sock_path(g), b'{"cmd": "history", "n": 3, "program": "b"}\n')
    records = reply["data"]["records"]
    assert reply["ok"] and len(records) == 3 and {r["program"] for r in records} == {"b"}
    assert records == g.history("b")[-3:]


def test_start_leaves_fatal(gosup_factory: Factory, goapp: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "needed.conf"
    g = started(
        gosup_factory(
            prog(goapp, "cfg", "-config", str(cfg), backoff="{ give_up_after = 1 }")
            + prog(goapp, "bad", "-mode", "exit", "-code", "1", backoff="{ give_up_after = 1 }")
        )
    )
    wait_state(g, "cfg", "FATAL")  # the config file it needs is missing
    wait_state(g, "bad", "FATAL")
    cfg.write_text("ok\n")
    r = run(g, "start", "cfg")
    assert r.returncode == 0, r.stderr
    assert status(g)["cfg"]["state"] == "RUNNING"
    # A start that fails again is reported as a failure.
    r = run(g, "start", "bad")
    assert r.returncode == 1
    assert "exit code 1" in r.stderr
    wait_state(g, "bad", "FATAL")


def test_signal_reaches_the_program(gosup_factory: Factory, goapp: Path, tmp_path: Path) -> None:
    files = {n: tmp_path / f"signals-{n}" for n in ("a", "b")}
    text = "".join(
        prog(goapp, n, "-report-signals", "-signal-file", str(f)) for n, f in files.items()
    ) + prog(goapp, "idle", autostart="false")
    g = started(gosup_factory(text))
    wait_state(g, "a", "RUNNING")
    wait_state(g, "b", "RUNNING")

    def got(name: str, line: str) -> bool:
        f = files[name]
        return f.exists() and line in f.read_text().splitlines()

    r = run(g, "signal", "USR1", "a")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("SIGUSR1 sent to a")
    wait_for(lambda: got("a", "signal: SIGUSR1"), 10, "SIGUSR1 in a")
    rec = g.history("a", "signal_sent")[-1]
    assert (rec["signal"], rec["reason"]) == ("SIGUSR1", "operator")

    r = run(g, "signal", "sigusr2", "all")  # all = every program that runs
    assert r.returncode == 0, r.stderr
    wait_for(lambda: got("a", "signal: SIGUSR2") and got("b", "signal: SIGUSR2"), 10, "SIGUSR2")

    r = run(g, "signal", "HUP", "idle")
    assert r.returncode == 1
    assert "not running" in r.stderr
    r = run(g, "signal", "SIGNOPE", "a")
    assert r.returncode == 2
    assert "unknown signal" in r.stderr
    assert status(g)["a"]["state"] == "RUNNING"


# -- reload -----------------------------------------------------------------------------


def test_reload_applies_only_the_difference(gosup_factory: Factory, goapp: Path) -> None:
    g = started(gosup_factory(prog(goapp, "keep") + prog(goapp, "change") + prog(goapp, "drop")))
    for name in ("keep", "change", "drop"):
        wait_state(g, name, "RUNNING")
    pids = {n: p["pid"] for n, p in status(g).items()}

    g.config.write_text(
        prog(goapp, "keep") + prog(goapp, "change", "-version", "2") + prog(goapp, "new")
    )
    r = run(g, "reload")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        "reloaded: added new; removed drop; restarted change; updated in place -"
    )
    now = {n: p for n, p in status(g).items()}
    assert list(now) == ["keep", "change", "new"]
    assert now["keep"]["pid"] == pids["keep"]
    assert now["change"]["pid"] != pids["change"]
    assert not pid_alive(pids["drop"]) and not pid_alive(pids["change"])
    wait_state(g, "new", "RUNNING")
    rec = g.history(event="supervisor_reloaded")[-1]
    assert rec["config_sha256"] == hashlib.sha256(g.config.read_bytes()).hexdigest()
    assert (rec["added"], rec["removed"], rec["changed"]) == (["new"], ["drop"], ["change"])

    # An invalid file: every error reported and logged, nothing touched.
    good = g.config.read_text()
    before = {n: p["pid"] for n, p in status(g).items()}
    records = len(g.history())
    g.config.write_text(good + '[programs.broken]\ncommand = []\nstart_seconds = "soon"\n')
    r = run(g, "reload")
    assert r.returncode == 2
    errors = r.stderr.splitlines()[1:]
    assert len(errors) == 2, r.stderr
    assert any("programs.broken.command" in e for e in errors)
    assert any("programs.broken.start_seconds" in e for e in errors)
    assert {n: p["pid"] for n, p in status(g).items()} == before
    assert len(g.history()) == records
    wait_for(lambda: "programs.broken.start_seconds" in g.log(), 10, "the errors in gosup's log")

    # SIGHUP does the same as `gosup reload`.
    g.config.write_text(prog(goapp, "keep") + prog(goapp, "change", "-version", "2"))
    assert g.proc is not None
    g.proc.send_signal(signal.SIGHUP)
    g.wait_event("supervisor_reloaded", count=2)
    wait_for(lambda: list(status(g)) == ["keep", "change"], 20, "new removed by SIGHUP")
    assert status(g)["keep"]["pid"] == pids["keep"]


def test_restart_cut_short_by_a_reload_is_answered(gosup_factory: Factory, goapp: Path) -> None:
    slow = prog(goapp, "slow", "-ignore-term", "-report-signals", stop_timeout='"5s"')
    g = started(gosup_factory(slow + prog(goapp, "other")))
    wait_state(g, "slow", "RUNNING")
    with subprocess.Popen(
        [sys.executable, "-m", "supervisor", "restart", "slow"],
        cwd=g.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as restart:
        try:
            wait_state(g, "slow", "STOPPING")
            g.config.write_text(prog(goapp, "other"))
            assert run(g, "reload").returncode == 0
        finally:
            _, err = restart.communicate(timeout=30)  # answered, not left waiting
    assert restart.returncode == 1
    assert "restart cancelled (removed by reload)" in err
    assert list(status(g)) == ["other"]


# -- one gosup per state_dir, peers --------------------------------------------------------


def test_second_gosup_is_refused(gosup_factory: Factory, goapp: Path) -> None:
    g = gosup_factory(prog(goapp, "a"))
    # A socket left behind by a gosup that died: bound, never unlinked.
    g.state_dir.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock_path(g)))
    started(g)
    pid = wait_state(g, "a", "RUNNING")["pid"]

    second = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(g.config)],
        cwd=g.dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already running" in second.stderr
    assert str(g.state_dir) in second.stderr
    assert status(g)["a"]["pid"] == pid
    assert len(g.history(event="supervisor_started")) == 1
    assert g.history(event="supervisor_stopped") == []
    assert len(g.history("a", "started")) == 1


def _python_for_others() -> str | None:
    """A Python >= 3.11 that another uid may execute (the venv's lives under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/usr/bin/python3.11"):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys, tomllib; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            user=65534,
            group=65534,
            extra_groups=[],
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other uids may traverse (pytest's tmp_path is private to root)."""
    path = Path(f"/tmp/gosup-ctl-{uuid.uuid4().hex[:8]}")
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_foreign_uid_is_refused(gosup_factory: Factory, goapp: Path, shared_dir: Path) -> None:
    python = _python_for_others()
    if python is None:
        pytest.skip("no Python >= 3.11 that uid 65534 may run")
    state = shared_dir / "state"
    g = started(gosup_factory(f'[supervisor]\nstate_dir = "{state}"\n\n' + prog(goapp, "a")))
    path = state / "gosup.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    pid = wait_state(g, "a", "RUNNING")["pid"]

    def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, *argv],
            user=65534,
            group=65534,
            extra_groups=[],
            env=env,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
        )

    # The 0700 directory and 0600 socket keep it out in the first place ...
    r = as_nobody("-m", "supervisor", "status", "--socket", str(path))
    assert r.returncode == 1
    assert "Permission denied" in r.stderr
    # ... and when someone loosens the modes, the peer check still refuses.
    os.chmod(state, 0o711)
    os.chmod(path, 0o666)
    r = as_nobody("-m", "supervisor", "restart", "a", "--socket", str(path))
    assert r.returncode == 1
    assert "permission denied: uid 65534" in r.stderr
    script = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        's.sendall(b\'{"cmd": "stop", "all": true}\\n\')\n'
        "data = b''\n"
        "while chunk := s.recv(4096): data += chunk\n"  # gosup hangs up after refusing
        "print(data.decode(), end='')\n"
    )
    r = as_nobody("-c", script, str(path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"ok": False, "error": "permission denied: uid 65534"}
    assert status(g)["a"]["pid"] == pid
    assert g.history("a", "restart_requested") == []
    assert "refused a connection from uid 65534" in g.log()


# -- bad input, shutdown, the client side ---------------------------------------------------


def test_bad_input_is_answered_and_survived(gosup_factory: Factory, goapp: Path) -> None:
    g = started(gosup_factory(prog(goapp, "a")))
    pid = wait_state(g, "a", "RUNNING")["pid"]
    records = len(g.history())
    path = sock_path(g)
    # A client that sends half a request and then sits there must not hold
    # up anybody else.
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(path))
    idle.sendall(b'{"cmd": "sta')
    try:
        lines = [
            b"garbage",
            b"",
            b"[1, 2]",
            b'{"cmd": 7}',
            b'{"cmd": "frobnicate"}',
            b'{"cmd": "restart"}',
            b'{"cmd": "restart", "names": ["nosuch"]}',
            b'{"cmd": "stop", "names": "a"}',
            b'{"cmd": "signal", "signal": "SIGNOPE", "names": ["a"]}',
            b'{"cmd": "signal", "names": ["a"]}',
            b'{"cmd": "history", "n": true}',
            b"\xc3(",
            b'{"cmd": "status"}',
        ]
        replies = raw(path, b"\n".join(lines) + b'\n{"cmd": "stop", "all": tr')
        assert len(replies) == len(lines) + 1
        assert all(r["ok"] is False and r["error"] for r in replies[:-2])
        errors = [r.get("error", "") for r in replies]
        assert "not JSON" in errors[0]
        assert "empty line" in errors[1]
        assert "JSON object" in errors[2]
        assert '"cmd" is missing or not a string' in errors[3]
        assert "unknown command 'frobnicate'" in errors[4]
        assert "name at least one program" in errors[5]
        assert "unknown program 'nosuch'" in errors[6]
        assert "'names' must be a list" in errors[7]
        assert "unknown signal 'SIGNOPE'" in errors[8]
        assert '"signal" is missing' in errors[9]
        assert "'n' must be an integer" in errors[10]
        assert "not UTF-8" in errors[11]
        assert replies[-2]["ok"] is True  # the same connection still serves
        assert "truncated request" in errors[-1]

        # Oversize: refused (the reply may be lost to the reset), then hung up.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as big:
            big.settimeout(20)
            big.connect(str(path))
            try:
                big.sendall(b"x" * (2 << 20))  # 2 MiB, no newline
                reply = big.recv(4096)
                assert reply == b"" or b"request too large" in reply
            except (BrokenPipeError, ConnectionResetError):
                pass
        r = run(g, "restart", "nosuch")
        assert r.returncode == 1
        assert run(g, "dump", "nosuch").returncode == 1
    finally:
        idle.close()
    assert status(g)["a"]["pid"] == pid
    assert len(g.history()) == records  # nothing changed state


def test_shutdown_and_exit_codes(gosup_factory: Factory, goapp: Path) -> None:
    g = started(gosup_factory(prog(goapp, "a") + prog(goapp, "b")))
    pids = [wait_state(g, n, "RUNNING")["pid"] for n in ("a", "b")]
    r = run(g, "shutdown")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "gosup stopped"
    assert g.proc is not None
    assert g.proc.wait(30) == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert not sock_path(g).exists()  # removed on the way out
    r = run(g, "status")
    assert r.returncode == 3
    assert "no gosup is running" in r.stderr
    # A stale socket is "not running" too; a missing config is a config error.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock_path(g)))
    assert run(g, "restart", "a").returncode == 3
    r = run(g, "status", "-c", "missing.toml")
    assert r.returncode == 2
    assert "missing.toml" in r.stderr


def test_status_import_path_stays_light(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "none.sock")
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "supervisor",
            "status",
            "--socket",
            nowhere,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stderr
    imported = {
        line.split("|")[-1].strip() for line in r.stderr.splitlines() if "import time:" in line
    }
    heavy = {"asyncio", "psutil", "loguru", "supervisor.service.daemon", "supervisor.core.program"}
    assert not imported & heavy


def test_status_table_format() -> None:
    programs = [
        {
            "name": "api",
            "state": "RUNNING",
            "pid": 42,
            "uptime_s": 3725.0,
            "restarts": 2,
            "rss_bytes": 50 * 2**20,
            "goroutines": 17,
            "last_exit": {
                "exit_code": 2,
                "signal": None,
                "crash": {"kind": "panic", "message": "boom"},
            },
        },
        {"name": "worker", "state": "STOPPED", "pid": None, "uptime_s": None, "restarts": 0},
    ]
    lines = status_cli.format_status(programs).splitlines()
    assert lines[0].split() == [
        "NAME", "STATE", "PID", "UPTIME", "RESTARTS", "RSS", "GOROUTINES", "LAST", "EXIT",
    ]  # fmt: skip
    assert lines[1].split() == [
        "api", "RUNNING", "42", "1h02m", "2", "50.0MiB", "17", "exit", "2", "(panic:", "boom)",
    ]  # fmt: skip
    assert lines[2].split() == ["worker", "STOPPED", "-", "-", "0", "-", "-", "-"]
    # A NOTE column only when a program has something to point out.
    noted = {"over_limit": {"rss": 2}, "sustain": 3, "scrape_error": "http://h:1/m: HTTP 404"}
    lines = status_cli.format_status([programs[0], {**programs[1], **noted}]).splitlines()
    assert lines[0].split()[-3:] == ["LAST", "EXIT", "NOTE"] and lines[1].endswith(" -")
    assert lines[2].endswith("  over rss 2/3; scrape: HTTP 404")
    assert status_cli.format_duration(4.25) == "4.2s"
    assert status_cli.format_duration(2 * 86400 + 7200) == "2d02h"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["a", "b"],
        ["--json"],
        ["-c", "other.toml", "a"],
        ["--config=other.toml", "--json"],
        ["--socket", "/run/x.sock", "--json", "a"],
        ["--socket=/run/x.sock"],
    ],
)
def test_fast_status_parses_like_argparse(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(status_cli, "cmd_status", lambda ns: seen.append(vars(ns)) or 0)
    assert status_cli.fast_status(argv) == 0
    from supervisor.cli import commands as cli

    full = vars(cli.build_parser().parse_args(["status", *argv]))
    assert seen == [{k: full[k] for k in ("names", "json", "config", "socket")}]


@pytest.mark.parametrize("argv", [["-h"], ["--bogus"], ["-c"], ["-cother.toml"], ["--socket"]])
def test_fast_status_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    assert status_cli.fast_status(argv) is None


def test_a_socket_whose_accept_queue_is_full_is_not_stale(tmp_path: Path) -> None:
    """A live gosup too busy to accept fills its queue: the connect of the
    stale-socket check fails with EAGAIN (a timeout makes it non-blocking).
    That is "somebody answers", not a traceback and not a removed socket."""
    from supervisor.service.control import AlreadyRunning, remove_stale_socket

    path = tmp_path / "gosup.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(0)
        fillers = []
        try:
            while True:  # fill the queue; nobody accepts
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                fillers.append(s)
                try:
                    s.connect(str(path))
                except BlockingIOError:
                    break
                assert len(fillers) < 1000, "the accept queue never filled"
            with pytest.raises(AlreadyRunning):
                remove_stale_socket(path)
            assert path.is_socket()
        finally:
            for s in fillers:
                s.close()
