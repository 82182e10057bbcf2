"""gosup under systemd: sd_notify messages seen on a real datagram socket,
the unit files checked by systemd-analyze, and privilege drop observed in
/proc (gosup runs as root on a host)."""

from __future__ import annotations

import contextlib
import grp
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_for

from supervisor.config import SupervisorSpec
from supervisor.core.states import ProcessState as S
from supervisor.service import systemd

UNITS = ROOT / "systemd"


# -- the protocol, in-process ------------------------------------------------------------


def test_socket_address_supports_paths_and_abstract_names() -> None:
    assert systemd.socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.socket_address("@gosup/notify") == b"\0gosup/notify"
    with pytest.raises(ValueError, match="absolute path or start with '@'"):
        systemd.socket_address("relative.sock")


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(mine) == 0.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_status_line_counts_states_in_lifecycle_order() -> None:
    states = [S.BACKOFF, S.RUNNING, S.RUNNING, S.FATAL, S.RUNNING, S.RUNNING]
    assert systemd.status_line(states) == "4 running, 1 backoff, 1 fatal"
    assert systemd.status_line([]) == "no programs"


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_one_datagram_per_message(tmp_path: Path, abstract: bool) -> None:
    name = f"@gosup-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(systemd.socket_address(name))
        sock.settimeout(5)
        notifier = systemd.Notifier({"NOTIFY_SOCKET": name})
        assert notifier.send("READY=1", "STATUS=1 running")
        assert sock.recv(4096) == b"READY=1\nSTATUS=1 running"
        notifier.close()


def test_without_notify_socket_there_is_no_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.Notifier().enabled
    assert not systemd.Notifier().send("READY=1")
    assert systemd.make_service(None) is None  # type: ignore[arg-type]


# -- a real gosup talking to a test socket ---------------------------------------------


SO_TIMESTAMP = 29  # Linux (asm-generic); not exported by the socket module


class NotifyListener:
    """Collects (receive time, message) datagrams sent to an abstract socket.

    The receive time is the kernel's (SO_TIMESTAMP), so a busy test process
    reading late cannot make two pings look closer than they were.
    """

    def __init__(self) -> None:
        self.address = f"@gosup-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(systemd.socket_address(self.address))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
                self.messages.append((_kernel_time(ancillary), data.decode()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def lines(self) -> list[str]:
        return [line for _, msg in list(self.messages) for line in msg.splitlines()]

    def index(self, line: str, after: int = -1) -> int | None:
        """Position (in lines()) of the first ``line`` after position ``after``."""
        for i, seen in enumerate(self.lines()):
            if i > after and seen == line:
                return i
        return None

    def wait(self, line: str, after: int = -1, timeout: float = 20.0) -> int:
        wait_for(lambda: self.index(line, after) is not None, timeout, f"{line} after {after}")
        found = self.index(line, after)
        assert found is not None
        return found


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP and len(data) >= 16:
            sec, usec = struct.unpack("qq", data[:16])
            return sec + usec / 1e6
    return time.time()


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    lst = NotifyListener()
    yield lst
    lst.close()


def _program(name: str, binary: Path, *args: str, extra: str = "") -> str:
    argv = ", ".join(f'"{a}"' for a in (str(binary), *args))
    return f'[programs.{name}]\ncommand = [{argv}]\nstart_seconds = "300ms"\n{extra}\n'


def test_ready_status_watchdog_reload_and_stopping(
    gosup_factory: Any, goapp: Path, listener: NotifyListener
) -> None:
    config = _program("api", goapp) + _program(
        "once", goapp, "-mode", "exit", "-after", "100ms", extra='restart = "never"'
    )
    g = gosup_factory(config)
    g.start(extra_env={"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "400000"})

    # READY=1 only once api runs and once has exited for good (with success).
    ready = listener.wait("READY=1")
    assert g.history("api", "running")
    assert g.history("once", "exited")
    status = [line for line in listener.lines()[: ready + 1] if line.startswith("STATUS=")]
    assert status[-1] == "STATUS=1 running, 1 exited"

    # The child never sees gosup's notify socket.
    environ = Path(f"/proc/{g.running_pid('api')}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for v in environ)

    # WATCHDOG=1 every WATCHDOG_USEC / 2 = 0.2 s, from the loop: never early.
    wait_for(lambda: _pings(listener) >= 8, 20, "8 watchdog pings")
    times = [t for t, msg in list(listener.messages) if msg == "WATCHDOG=1"]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.15, gaps
    assert statistics.median(gaps) < 0.6, gaps

    # A reload: RELOADING=1, then READY=1 once the added program runs.
    g.config.write_text(g.config.read_text() + _program("added", goapp))
    os.kill(g.pid, signal.SIGHUP)
    reloading = listener.wait("RELOADING=1", after=ready)
    listener.wait("READY=1", after=reloading)
    assert g.history("added", "running")
    assert any(line.startswith("MONOTONIC_USEC=") for line in listener.lines()[reloading:])

    assert g.stop() == 0
    stopping = listener.index("STOPPING=1")
    assert stopping is not None and stopping > reloading
    # The last STATUS (a WATCHDOG=1 ping may still follow it on a loaded machine:
    # the watchdog is kept until the service closes).
    statuses = [line for line in listener.lines() if line.startswith("STATUS=")]
    assert statuses[-1] == "STATUS=stopping: 3 stopped"


def test_no_ready_while_a_program_is_fatal_and_status_says_why(
    gosup_factory: Any, goapp: Path, listener: NotifyListener
) -> None:
    """A program that cannot start must fail `systemctl start`, not pass it."""
    config = _program("api", goapp) + _program(
        "broken",
        goapp,
        "-fail-start",
        "listen tcp :80: bind: permission denied",
        extra='[programs.broken.backoff]\ninitial = "100ms"\ngive_up_after = 2',
    )
    g = gosup_factory(config).start(extra_env={"NOTIFY_SOCKET": listener.address})
    g.wait_event("fatal", "broken")
    g.running_pid("api")
    want = (
        "STATUS=1 running, 1 fatal; waiting for broken: fatal "
        "(exit code 1: listen tcp :80: bind: permission denied)"
    )
    listener.wait(want)
    assert "READY=1" not in listener.lines()
    assert g.stop() == 0
    assert "READY=1" not in listener.lines()


def _pings(listener: NotifyListener) -> int:
    return sum(1 for _, msg in list(listener.messages) if msg == "WATCHDOG=1")


def test_no_watchdog_pings_meant_for_another_pid(
    gosup_factory: Any, goapp: Path, listener: NotifyListener
) -> None:
    g = gosup_factory(_program("api", goapp))
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
    g.start(extra_env=env)
    listener.wait("READY=1")
    assert g.stop() == 0
    assert _pings(listener) == 0


# -- the unit files ---------------------------------------------------------------------


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)?", value):
        total += float(number) * units[unit or "s"]
    return total


@pytest.mark.parametrize("unit", ["gosup.service", "gosup@.service"])
def test_unit_supervises_the_way_gosup_needs(unit: str) -> None:
    d = _directives(UNITS / unit)
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["KillMode"] == ["mixed"]
    assert d["Restart"] == ["on-failure"]
    assert d["OOMPolicy"] == ["continue"]  # a child's OOM kill must not stop gosup
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["StateDirectory"] and d["LogsDirectory"]
    assert 0 < _seconds(d["WatchdogSec"][0]) <= 60
    # gosup stops everything within shutdown_timeout; systemd must wait longer.
    default_shutdown = SupervisorSpec(Path("."), Path(".")).shutdown_timeout
    assert _seconds(d["TimeoutStopSec"][0]) > default_shutdown + 5
    if unit.startswith("gosup@"):
        assert any("/etc/gosup/%i.toml" in v for v in d["ExecStart"])


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


@pytest.mark.parametrize(
    ("unit", "as_name"),
    [
        ("gosup.service", "gosup.service"),
        ("gosup@.service", "gosup@.service"),
        ("gosup@.service", "gosup@shop.service"),
    ],
)
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path, unit: str, as_name: str) -> None:
    analyze = _systemd_analyze()
    gosup = shutil.which("gosup", path=str(Path(sys.executable).parent))
    assert gosup is not None, "the gosup entry point is not installed in this venv"
    # verify checks that ExecStart's binary exists: point it at this checkout's gosup.
    text = (UNITS / unit).read_text().replace("/usr/local/bin/gosup", gosup)
    (tmp_path / as_name).write_text(text)
    run = subprocess.run(
        [analyze, "verify", as_name], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip() == "", run.stderr  # warnings (unknown keys, bad values) too


# -- privilege drop ------------------------------------------------------------------------


def _status_ids(pid: int) -> dict[str, list[int]]:
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(v) for v in value.split()]
    return ids


def test_programs_run_as_their_user_and_group(gosup_factory: Any, public_goapp: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("privilege drop needs gosup to run as root")
    nobody = pwd.getpwnam("nobody")
    daemon_gid = grp.getgrnam("daemon").gr_gid
    directory = f'directory = "{public_goapp.parent}"'
    g = gosup_factory(
        _program("plain", public_goapp, extra=f'user = "nobody"\n{directory}')
        + _program("grouped", public_goapp, extra=f'user = "nobody"\ngroup = "daemon"\n{directory}')
    ).start()

    ids = _status_ids(g.running_pid("plain"))
    assert ids["Uid"] == [nobody.pw_uid] * 4  # real, effective, saved, filesystem
    assert ids["Gid"] == [nobody.pw_gid] * 4
    assert sorted(ids["Groups"]) == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    env = Path(f"/proc/{g.running_pid('plain')}/environ").read_bytes().split(b"\0")
    assert b"USER=nobody" in env and b"LOGNAME=nobody" in env
    assert f"HOME={nobody.pw_dir}".encode() in env

    ids = _status_ids(g.running_pid("grouped"))
    assert ids["Uid"] == [nobody.pw_uid] * 4
    assert ids["Gid"] == [daemon_gid] * 4
    assert sorted(ids["Groups"]) == sorted(set(os.getgrouplist("nobody", daemon_gid)))
    assert g.stop() == 0


# -- the fleet example ---------------------------------------------------------------------


def test_ansible_playbook_passes_syntax_check() -> None:
    # The test extra installs ansible-core into the venv, beside this Python.
    beside = Path(sys.executable).parent / "ansible-playbook"
    playbook = str(beside) if beside.exists() else shutil.which("ansible-playbook")
    if playbook is None:
        pytest.skip("ansible-playbook is not installed (the test extra brings ansible-core)")
    example = ROOT / "examples" / "ansible"
    run = subprocess.run(
        [playbook, "--syntax-check", "-i", "inventory.ini", "playbook.yml"],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
