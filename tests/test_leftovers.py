"""The leftover sweep at start trusts only what is provably gosup's (issue
16.1, 16.2) and stops every program's leftovers at once (issue 15.8).

Decoys are real processes of an unprivileged user made with ``useradd``:
they carry gosup's marks (``GOSUP_STATE_DIR``, ``GOSUP_PROGRAM``) and
ignore SIGTERM, the cheapest way a local user could slow gosup's start and
write into its history."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Gosup, pid_alive, wait_for

from supervisor.service import orphans

STRANGER = "gosupdecoy"


@pytest.fixture(scope="module")
def stranger() -> pwd.struct_passwd:
    """An unprivileged local user (created once with useradd)."""
    if os.geteuid() != 0:
        pytest.skip("creating an unprivileged user and its processes needs root")
    try:
        return pwd.getpwnam(STRANGER)
    except KeyError:
        pass
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", STRANGER],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        # Another test run may have made it meanwhile, or held /etc/passwd's lock.
        def made() -> pwd.struct_passwd | None:
            with contextlib.suppress(KeyError):
                return pwd.getpwnam(STRANGER)
            subprocess.run(done.args, capture_output=True)
            return None

        user: pwd.struct_passwd = wait_for(made, 30, f"useradd {STRANGER} ({done.stderr.strip()})")
        return user
    return pwd.getpwnam(STRANGER)


@pytest.fixture
def as_stranger(stranger: pwd.struct_passwd) -> Iterator[Callable[..., psutil.Process]]:
    """Start processes as the stranger; all of them are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> psutil.Process:
        proc = subprocess.Popen(
            list(argv),
            user=stranger.pw_uid,
            group=stranger.pw_gid,
            extra_groups=[],
            cwd="/",
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        started.append(proc)
        # Wait until it runs its final program (exec'd sleep, not sh or env).
        wait_for(lambda: psutil.Process(proc.pid).name() == "sleep", 10, "the decoy to exec")
        return psutil.Process(proc.pid)

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _decoy(state_dir: Path, program: str) -> list[str]:
    return [
        "env",
        f"GOSUP_STATE_DIR={state_dir.resolve()}",
        f"GOSUP_PROGRAM={program}",
        "sh",
        "-c",
        'trap "" TERM; exec sleep 1000',
    ]


def _ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()


def _killed_gosup(gosup_factory: Any, config: str) -> Gosup:
    """A gosup that ran its programs and was SIGKILLed (pids.json stays)."""
    first = gosup_factory(config).start()
    names = re.findall(r"^\[programs\.([\w-]+)\]$", config, re.MULTILINE)
    pids = [first.running_pid(name) for name in names]
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    wait_for(lambda: not any(pid_alive(pid) for pid in pids), 10, "the programs to die")
    return first


def _api(goapp: Path, stop_timeout: str = "10s", name: str = "api", *args: str) -> str:
    argv = ", ".join(f'"{a}"' for a in (str(goapp), *args))
    return (
        f'[programs.{name}]\ncommand = [{argv}]\nstart_seconds = "100ms"\n'
        f'stop_timeout = "{stop_timeout}"\n'
    )


def test_decoys_of_another_user_neither_delay_the_start_nor_write_history(
    gosup_factory: Any, goapp: Path, as_stranger: Callable[..., psutil.Process]
) -> None:
    config = _api(goapp)  # a 10 s grace: what a trusted decoy would cost
    first = _killed_gosup(gosup_factory, config)
    # Started after the killed gosup, carrying its marks, ignoring SIGTERM.
    decoys = [as_stranger(*_decoy(first.state_dir, name)) for name in ("x", "api", "y", "api")]
    second = Gosup(first.dir, config)
    second.start()
    try:
        assert second.proc is not None
        born = psutil.Process(second.proc.pid).create_time()
        started = second.wait_event("supervisor_started", count=2)[-1]
        second.wait_event("running", "api", count=2)
        assert all(d.is_running() and d.status() != psutil.STATUS_ZOMBIE for d in decoys)
        records = second.history()
        assert not [r for r in records if r.get("reason") == "leftover"], [
            line for line in second.log().splitlines() if "leftover" in line or "pids" in line
        ]
        assert not [r for r in records if r.get("program") in ("x", "y")]
        # Measured, not asserted tightly: the sweep itself costs milliseconds.
        assert _ts(started) - born < 8.0
    finally:
        assert second.stop() == 0


def test_a_recorded_pid_reused_by_another_user_is_left_alone(
    gosup_factory: Any, goapp: Path, as_stranger: Callable[..., psutil.Process]
) -> None:
    config = _api(goapp, "1s")
    first = _killed_gosup(gosup_factory, config)
    # The recorded child's pid now belongs to another user's process, with the
    # very start time recorded: only its owner tells that it is not ours.
    bystander = as_stranger("sleep", "1000")
    pids_file = first.state_dir / orphans.PIDS_FILE
    data = json.loads(pids_file.read_text())
    data["programs"]["api"] = {
        "pid": bystander.pid,
        "create_time": bystander.create_time(),
        "pgid": os.getpgid(bystander.pid),
        "sid": os.getsid(bystander.pid),
    }
    pids_file.write_text(json.dumps(data))
    second = Gosup(first.dir, config).start()
    try:
        second.wait_event("running", "api", count=2)
        assert bystander.is_running() and bystander.status() != psutil.STATUS_ZOMBIE
        assert not second.history(event="stopped")
    finally:
        assert second.stop() == 0


def test_every_programs_leftovers_are_stopped_at_once(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    names = [f"p{i}" for i in range(6)]
    config = "".join(
        _api(
            goapp,
            "2s",  # each program's stubborn helper costs the full grace
            name,
            "-grandchild",
            "-grandchild-setsid",
            "-grandchild-pidfile",
            str(tmp_path / f"{name}.helper"),
        )
        for name in names
    )
    first = _killed_gosup(gosup_factory, config)
    helpers = [int((tmp_path / f"{n}.helper").read_text().split()[0]) for n in names]
    assert all(pid_alive(pid) for pid in helpers)
    second = Gosup(first.dir, config).start()
    try:
        stopped = second.wait_event(
            "stopped", count=6, timeout=60, where=lambda r: r.get("reason") == "leftover"
        )
        assert sorted(r["program"] for r in stopped) == names
        assert all(r["killed"] for r in stopped)
        assert not any(pid_alive(pid) for pid in helpers)
        # One grace period for all: one after another they would span 4 x 2 s at
        # least; a loaded machine may spread the records a little.
        span = max(map(_ts, stopped)) - min(map(_ts, stopped))
        assert span < 6.0, f"leftovers stopped one program at a time ({span:.1f}s apart)"
        for name in names:
            second.wait_event("running", name, count=2, timeout=30)
    finally:
        assert second.stop(signal.SIGTERM) == 0


def test_a_crash_sweeps_only_our_own_marked_helpers(
    gosup_factory: Any, goapp: Path, as_stranger: Callable[..., psutil.Process]
) -> None:
    """After a crash gosup kills the helpers a run left (found by their marks):
    a decoy of another user carrying the same marks is not one of them."""
    g = gosup_factory(_api(goapp, "1s", "api", "-mode", "exit", "-code", "1", "-after", "1s"))
    g.start()
    g.running_pid("api")
    decoy = as_stranger(*_decoy(g.state_dir, "api"))
    g.wait_event("exited", "api", count=2, timeout=30)
    assert decoy.is_running() and decoy.status() != psutil.STATUS_ZOMBIE
    assert g.stop() == 0


_SQUAT = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(bytes.fromhex(sys.argv[1]))
s.listen(1)
os.set_inheritable(s.fileno(), True)
os.execvp("sleep", ["sleep", "1000"])
"""


def test_a_squatted_instance_name_does_not_keep_gosup_from_starting(
    gosup_factory: Any, goapp: Path, as_stranger: Callable[..., psutil.Process]
) -> None:
    """Abstract socket names have no permissions: another user may bind the
    name of our state_dir first. gosup asks who holds it and starts anyway."""
    from supervisor.service.control import instance_name

    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 for the squatter")
    g = gosup_factory(_api(goapp, "1s"))
    g.state_dir.mkdir(mode=0o700)
    squatter = as_stranger("/usr/bin/python3", "-c", _SQUAT, instance_name(g.state_dir).hex())
    g.start()
    g.running_pid("api")
    assert f"held by pid {squatter.pid} of uid {squatter.uids().real}" in g.log()
    assert g.stop() == 0
