"""Nothing gosup started outlives it: a SIGKILLed gosup's leftovers are
stopped by the next one before it starts anything, pid records are kept,
reused pids are left alone, one gosup runs per state_dir, and as PID 1 gosup
reaps orphaned zombies without stealing its own children's exit statuses.

``child_of_test`` and ``kill_gosup_and_wait_gone`` serve the tests that a
build (test_devmode) and a validator (test_configsync) die with gosup."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import TAG_VAR, Gosup, pid_alive, tagged_processes, wait_for

from supervisor.protocol import LOCK_NAME
from supervisor.service import orphans


def _program(name: str, binary: Path | str, *args: str, extra: str = "") -> str:
    argv = ", ".join(f'"{a}"' for a in (str(binary), *args))
    return (
        f'[programs.{name}]\ncommand = [{argv}]\nstart_seconds = "200ms"\n'
        f'stop_timeout = "500ms"\n{extra}\n'
    )


def _pid_in(path: Path) -> int:
    """The pid a goapp -pidfile wrote ("<pid> <start nanos>")."""
    text: str = wait_for(lambda: path.exists() and path.read_text(), 15, f"pid file {path}")
    return int(text.split()[0])


def _program_processes(tag: str, name: str) -> list[int]:
    """Pids of live (non-zombie) processes of program ``name`` from this test."""
    found = []
    for proc in tagged_processes(tag):
        try:
            env = proc.environ()
            if env.get(orphans.PROGRAM_VAR) == name and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(found)


def child_of_test(tag: str, *args: str) -> psutil.Process | None:
    """The live process of this test whose arguments (after argv[0]) are ``args``."""
    for proc in tagged_processes(tag):
        with contextlib.suppress(psutil.Error):
            if proc.cmdline()[1:] == list(args) and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
    return None


def kill_gosup_and_wait_gone(g: Gosup, child: psutil.Process, program: str) -> None:
    """``child`` carries gosup's marks; SIGKILL gosup, and ``child`` dies with it."""
    env = child.environ()
    assert env[orphans.STATE_DIR_VAR] == str(g.state_dir.resolve())
    assert env[orphans.PROGRAM_VAR] == program
    assert g.proc is not None
    g.proc.kill()
    g.proc.wait()
    wait_for(lambda: not pid_alive(child.pid), 10, f"pid {child.pid} to die with gosup")


def test_next_gosup_stops_what_a_sigkilled_one_left(
    gosup_factory: Any, goapp: Path, tmp_path: Path, no_leftover_processes: str
) -> None:
    tag = no_leftover_processes
    config = _program(
        "api",
        goapp,
        "-pidfile",
        str(tmp_path / "api.pid"),
        "-grandchild",
        "-grandchild-setsid",  # leaves the process group and the session
        "-grandchild-pidfile",
        str(tmp_path / "api-helper.pid"),
    ) + _program(
        "worker",
        goapp,
        "-pidfile",
        str(tmp_path / "worker.pid"),
        "-grandchild",  # stays in the process group
        "-grandchild-pidfile",
        str(tmp_path / "worker-helper.pid"),
    )
    first = gosup_factory(config).start()
    api, worker = first.running_pid("api"), first.running_pid("worker")
    helpers = [_pid_in(tmp_path / "api-helper.pid"), _pid_in(tmp_path / "worker-helper.pid")]

    def written() -> dict[str, Any] | None:
        # pids.json is written from a disk thread, coalesced over PIDS_WINDOW.
        try:
            data = json.loads((first.state_dir / orphans.PIDS_FILE).read_text())
        except (OSError, ValueError):
            return None
        progs = data.get("programs", {})
        pids = {n: progs.get(n, {}).get("pid") for n in ("api", "worker")}
        return data if pids == {"api": api, "worker": worker} else None

    records = wait_for(written, 10, "pids.json naming both children")
    assert records["supervisor"]["pid"] == first.pid
    assert records["programs"]["api"]["pid"] == api
    assert records["programs"]["api"]["pgid"] == api  # each child leads its own group
    assert records["programs"]["worker"]["sid"] == worker

    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    # The children die with gosup (PR_SET_PDEATHSIG); their helpers do not.
    wait_for(lambda: not pid_alive(api) and not pid_alive(worker), 10, "children to die")
    assert all(pid_alive(pid) for pid in helpers)
    (tmp_path / "api-helper.pid").unlink()
    (tmp_path / "worker-helper.pid").unlink()

    second = Gosup(first.dir, config).start()
    try:
        # The history is shared: the second run's records come after the first's.
        api2 = second.wait_event("running", "api", count=2)[-1]["pid"]
        worker2 = second.wait_event("running", "worker", count=2)[-1]["pid"]
        # The leftovers were stopped before anything started again.
        assert not any(pid_alive(pid) for pid in helpers)
        records = second.history()
        second_start = max(i for i, r in enumerate(records) if r["event"] == "supervisor_started")
        leftovers = [
            (i, r)
            for i, r in enumerate(records)
            if r["event"] == "stopped" and r["reason"] == "leftover"
        ]
        assert {r["program"] for _, r in leftovers} == {"api", "worker"}
        assert {r["pid"] for _, r in leftovers} == {api, worker}
        assert all(r["killed"] is True for _, r in leftovers)  # the helpers ignore SIGTERM
        assert all(i < second_start for i, _ in leftovers)  # before anything started again
        # One instance of each program: its main process and its one helper.
        helper2 = _pid_in(tmp_path / "api-helper.pid")
        assert _program_processes(tag, "api") == sorted([api2, helper2])
        helper2 = _pid_in(tmp_path / "worker-helper.pid")
        assert _program_processes(tag, "worker") == sorted([worker2, helper2])
    finally:
        assert second.stop() == 0
    # A clean exit leaves no pid records behind.
    assert not (second.state_dir / orphans.PIDS_FILE).exists()


def test_children_carry_the_state_dir_and_their_name(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(_program("api", goapp)).start()
    env = psutil.Process(g.running_pid("api")).environ()
    assert env[orphans.STATE_DIR_VAR] == str(g.state_dir.resolve())
    assert env[orphans.PROGRAM_VAR] == "api"
    assert g.stop() == 0


@pytest.fixture
def bystander() -> Iterator[psutil.Process]:
    """A process that is none of gosup's business (carries the test tag, though)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_is_left_alone(
    gosup_factory: Any, goapp: Path, bystander: psutil.Process
) -> None:
    g = gosup_factory(_program("api", goapp))
    g.state_dir.mkdir(mode=0o700)
    # The previous gosup's child had this pid, but it started at another time.
    stale = {
        "pid": bystander.pid,
        "create_time": bystander.create_time() - 100,
        "pgid": bystander.pid,
        "sid": bystander.pid,
    }
    (g.state_dir / orphans.PIDS_FILE).write_text(
        json.dumps({"supervisor": None, "programs": {"api": stale}})
    )
    g.start()
    g.running_pid("api")
    assert bystander.is_running() and bystander.status() != psutil.STATUS_ZOMBIE
    assert not g.history(event="stopped")
    assert g.stop() == 0


def test_refuses_to_start_beside_a_live_gosup_of_the_same_state_dir(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(_program("api", goapp))
    g.state_dir.mkdir(mode=0o700)
    # What a running gosup holds for its whole life: the flock, its pid in the file.
    fd = os.open(g.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        g.start()
        assert g.proc is not None
        assert g.proc.wait(30) == 1
    finally:
        os.close(fd)
    assert f"another gosup (pid {os.getpid()}) is already running with state_dir" in g.log()
    assert not g.history(event="started")


def test_a_recorded_gosup_that_holds_no_lock_is_not_running(
    gosup_factory: Any, goapp: Path, bystander: psutil.Process
) -> None:
    """Only the lock says that a gosup runs: a pids.json naming a live process
    (its pid reused since) does not keep gosup from starting, nor is that
    process touched."""
    g = gosup_factory(_program("api", goapp))
    g.state_dir.mkdir(mode=0o700)
    me = {"pid": bystander.pid, "create_time": bystander.create_time()}
    (g.state_dir / orphans.PIDS_FILE).write_text(json.dumps({"supervisor": me, "programs": {}}))
    g.start()
    g.running_pid("api")
    assert bystander.is_running() and bystander.status() != psutil.STATUS_ZOMBIE
    assert g.stop() == 0


# -- PID 1 ---------------------------------------------------------------------------------


def _unshare() -> str:
    found = shutil.which("unshare")
    if found is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(
        [found, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.strip()}")
    return found


def _zombie_children(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    zombies = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.Error:
            continue
    return zombies


def test_as_pid_1_reaps_orphans_and_keeps_its_childrens_exit_status(
    tmp_path: Path, goapp: Path, no_leftover_processes: str
) -> None:
    unshare = _unshare()
    assert os.environ[TAG_VAR] == no_leftover_processes  # inherited inside the namespace
    signals = tmp_path / "signals.txt"
    # Each ( ... &) leaves an orphan that the namespace's init, gosup, inherits.
    orphaner = "(sleep 0.2 &); (sleep 0.3 &); (sleep 0.4 &); exec sleep 60"
    g = Gosup(
        tmp_path,
        _program("orphaner", "/bin/sh", "-c", orphaner)
        + _program(
            "quitter",
            goapp,
            "-mode",
            "exit",
            "-code",
            "7",
            "-after",
            "1s",
            extra='restart = "never"',
        )
        + _program("listener", goapp, "-report-signals", "-signal-file", str(signals)),
    )
    cmd = [unshare, "--pid", "--fork", "--mount-proc", sys.executable, "-m", "supervisor"]
    with open(g.out, "wb") as out, open(g.err, "wb") as err:
        outer = subprocess.Popen(
            [*cmd, "run", str(g.config), "-v"], cwd=tmp_path, stdout=out, stderr=err
        )
    try:
        gosup = wait_for(lambda: psutil.Process(outer.pid).children(), 15, "gosup")[0]
        g.proc = outer  # for wait_event's liveness check
        g.wait_event("running", "listener")
        assert json.loads((g.state_dir / orphans.PIDS_FILE).read_text())["supervisor"]["pid"] == 1

        # The three orphans were reaped by gosup, and the exit code of its own
        # child was not stolen by the reaper.
        wait_for(lambda: g.log().count("reaped orphan pid") >= 3, 20, "3 orphans reaped")
        assert g.wait_event("exited", "quitter")[0]["exit_code"] == 7
        wait_for(lambda: not _zombie_children(gosup.pid), 10, "no zombie children of gosup")

        # Signals still reach gosup (PID 1 ignores those it has no handler for).
        os.kill(gosup.pid, signal.SIGWINCH)  # sleep ignores it
        wait_for(lambda: signals.exists() and "SIGWINCH" in signals.read_text(), 10, "SIGWINCH")
        os.kill(gosup.pid, signal.SIGTERM)
        assert outer.wait(30) == 0
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
    assert g.history(event="supervisor_stopped")
    stopped = {r["program"] for r in g.history(event="stopped") if r["reason"] == "shutdown"}
    assert stopped == {"orphaner", "listener"}
