"""The hot spots of issue 18 stay cold, and keep their jobs.

- pids.json is written only when the set of running children changes, at
  most once per window, off the loop; a gosup SIGKILLed before the file
  caught up with a start still has that run's helpers stopped by the next
  gosup (they carry the marks).
- our cgroup's paths and limits are read once per few seconds, not at each
  start; a reload makes them read again.
- the crash sweep of a subreaper gosup reads only the environments of the
  orphans it adopted, not every process's; a crash whose group is empty
  and that left no orphan is not swept at all (``spawn.strays``).
- the reaper reads the state of the children it did not start only.
- a stop's tree walk reads the tree's own /proc entries, not every process's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Gosup, pid_alive, wait_for

from supervisor.config import appconfig
from supervisor.core import cgroup, spawn
from supervisor.health import goenv
from supervisor.service import orphans

WAIT = 20.0


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


async def _until(cond: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- pids.json ----------------------------------------------------------------------------


def test_pids_json_is_not_rewritten_when_the_set_of_children_stays(tmp_path: Path) -> None:
    path = tmp_path / "pids.json"
    pids = orphans.PidFile(path)
    me = os.getpid()

    async def main() -> None:
        pids.on_record({"event": "started", "program": "api", "pid": me})
        await pids.drain()
        assert pids.writes == 1
        # State changes that name no new child, or a child that is not the
        # current one (an overlap's old run), change nothing in the file.
        pids.on_record({"event": "running", "program": "api", "pid": me})
        pids.on_record({"event": "started", "program": "api", "pid": me})
        pids.on_record({"event": "stopped", "program": "api", "pid": me + 1})
        pids.on_record({"event": "exited", "program": "web", "pid": me})
        pids.on_record({"event": "backoff", "program": "api"})
        await pids.drain()
        assert pids.writes == 1
        # A change undone before its window came writes nothing either.
        pids.on_record({"event": "exited", "program": "api", "pid": me})
        pids.on_record({"event": "started", "program": "api", "pid": me})
        await pids.drain()
        assert pids.writes == 1
        assert json.loads(path.read_text())["programs"]["api"]["pid"] == me

    asyncio.run(main())


def test_a_burst_of_starts_and_exits_is_written_once_per_window(tmp_path: Path) -> None:
    """A crash loop: every run is a start and an exit. The file follows in at
    most one write per window, and ends up naming exactly what runs."""
    path = tmp_path / "pids.json"
    pids = orphans.PidFile(path, window=0.2)
    children = [_sleeper() for _ in range(3)]
    try:

        async def main() -> float:
            t0 = time.monotonic()
            for _ in range(100):
                for i, child in enumerate(children):
                    pids.on_record({"event": "started", "program": f"p{i}", "pid": child.pid})
                    pids.on_record({"event": "exited", "program": f"p{i}", "pid": child.pid})
                await asyncio.sleep(0.005)
            for i, child in enumerate(children[:2]):
                pids.on_record({"event": "started", "program": f"p{i}", "pid": child.pid})
            await pids.drain()
            return time.monotonic() - t0

        elapsed = asyncio.run(main())
        assert 1 <= pids.writes <= 2 + elapsed / 0.2, (pids.writes, elapsed)
        _, records = orphans.PidFile.read(path)
        assert {n: r.pid for n, r in records.items()} == {"p0": children[0].pid,
                                                          "p1": children[1].pid}  # fmt: skip
        assert records["p0"].create_time == psutil.Process(children[0].pid).create_time()
        assert records["p0"].pgid == os.getpgid(children[0].pid)
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_start_that_pids_json_missed_is_still_swept_by_the_next_gosup(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    """gosup is SIGKILLed while pids.json lags behind a start (here: its
    writer is stuck on a FIFO for good). The run's child dies with gosup; the
    helper it started in a session of its own is found by its marks and
    stopped before anything starts again."""
    helper_file = tmp_path / "helper.pid"
    argv = ", ".join(
        f'"{a}"'
        for a in (goapp, "-grandchild", "-grandchild-setsid", "-grandchild-pidfile", helper_file)
    )
    config = (
        f'[programs.api]\ncommand = [{argv}]\nstart_seconds = "100ms"\n'
        'stop_timeout = "500ms"\nautostart = false\n'
    )
    first = gosup_factory(config).start()
    pids_json = first.state_dir / orphans.PIDS_FILE
    wait_for(pids_json.exists, 10, "gosup's own record in pids.json")
    os.mkfifo(pids_json.with_name(pids_json.name + ".tmp"))  # the next write never ends
    assert first.cli("start", "api").returncode == 0
    api = first.running_pid("api")
    helper = int(wait_for(lambda: helper_file.exists() and helper_file.read_text(), 10).split()[0])
    assert "api" not in json.loads(pids_json.read_text())["programs"]
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    wait_for(lambda: not pid_alive(api), 10, "the child to die with gosup")
    assert pid_alive(helper)
    pids_json.with_name(pids_json.name + ".tmp").unlink()

    second = Gosup(first.dir, config).start()
    try:
        stopped = second.wait_event("stopped", "api", timeout=WAIT)[-1]
        assert stopped["reason"] == "leftover" and helper in stopped["pids"]
        assert not pid_alive(helper)
    finally:
        assert second.stop() == 0


# -- cgroup paths and limits -----------------------------------------------------------------


def test_our_cgroup_is_read_once_per_interval_and_again_after_forget(
    monkeypatch: Any,
) -> None:
    reads: list[Path] = []
    real = cgroup._read_paths

    def counted(proc: Path) -> dict[str, str]:
        reads.append(proc)
        return real(proc)

    monkeypatch.setattr(cgroup, "_read_paths", counted)
    cgroup.forget()
    first = cgroup.cgroup_paths()
    for _ in range(100):
        assert cgroup.cgroup_paths() == first
    assert reads == [cgroup.SELF]
    cgroup.forget()
    cgroup.cgroup_paths()
    assert reads == [cgroup.SELF, cgroup.SELF]
    # Any other /proc directory is read each time.
    cgroup.cgroup_paths(Path("/proc/1"))
    cgroup.cgroup_paths(Path("/proc/1"))
    assert reads[2:] == [Path("/proc/1")] * 2


def test_go_env_reads_the_cgroup_limits_again_only_when_they_may_have_changed(
    monkeypatch: Any,
) -> None:
    calls = []
    real = goenv.cgroup_limits

    def counted(*args: Any) -> goenv.CgroupLimits:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(goenv, "cgroup_limits", counted)
    provider = goenv.GoEnv(lambda: {})
    limits = provider.limits()
    for _ in range(100):
        assert provider.limits() == limits
    assert len(calls) == 1
    cgroup.forget()  # a reload
    provider.limits()
    assert len(calls) == 2


# -- the crash sweep and the reaper --------------------------------------------------------------


def test_the_sweep_of_a_subreaper_looks_only_at_what_it_adopted(tmp_path: Path) -> None:
    """A process carrying our marks that is no descendant of ours (it cannot
    be a run's leftover when gosup adopts every orphan of its children) is
    found by the full scan a gosup without a subreaper makes, not by the
    look at the adopted children."""
    env = {**os.environ, orphans.STATE_DIR_VAR: str(tmp_path), orphans.PROGRAM_VAR: "api"}
    pid_file = tmp_path / "outsider.pid"
    # Double-forked: re-parented to init, not to this test.
    subprocess.run(["sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! > {pid_file}"], env=env)
    outsider = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10))
    try:
        me = frozenset({os.geteuid()})
        trust = orphans.Trust({}, me, psutil.Process().create_time() - 1, time.time() + 60)
        assert [p.pid for p in orphans.marked(tmp_path, "api", trust)] == [outsider]
        assert orphans.adopted_marked(tmp_path, "api", trust) == []
    finally:
        os.kill(outsider, signal.SIGKILL)
        wait_for(lambda: not pid_alive(outsider), 10, "the outsider to go")


_STRAYS = """
import os, signal, threading
from pathlib import Path
from supervisor.core import spawn

assert spawn.become_subreaper()
assert not spawn.strays(), "no child yet"
started, done = threading.Event(), threading.Event()
helper = []

def program():  # started by another thread, as gosup's spawn thread starts programs
    cmd = ["sh", "-c", "setsid sleep 60 </dev/null >/dev/null 2>&1 & echo $!"]
    p = spawn.start_child(cmd, Path("."), dict(os.environ))
    helper.append(int(p.stdout.read().split()[0]))
    p.wait()  # the program is gone: its helper is an orphan now
    started.set()
    done.wait(30)  # this thread, the one that started the program, lives on

t = threading.Thread(target=program)
t.start()
try:
    assert started.wait(30)
    main = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print("stray", spawn.strays(), helper[0], main, flush=True)
finally:  # the helper never outlives this script
    if helper:
        os.kill(helper[0], signal.SIGKILL)
        os.waitpid(helper[0], 0)
print("after", spawn.strays(), flush=True)
done.set()
t.join()
"""


def test_an_orphan_comes_to_the_main_thread_and_is_a_stray(tmp_path: Path) -> None:
    """``spawn.strays`` reads only the main thread's children: the kernel gives
    an orphan to its subreaper's first live thread, even when another thread
    (still alive) started the program that left it."""
    proc = subprocess.run(
        [sys.executable, "-c", _STRAYS],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    word, verdict, helper, main = first.split(" ", 3)
    assert (word, verdict) == ("stray", "True"), first
    assert f"'{helper}'" in main, f"the orphan {helper} is not the main thread's child: {main}"
    assert second == "after False", second


def test_the_reaper_reads_no_state_of_the_children_it_is_told_to_skip() -> None:
    running = [_sleeper() for _ in range(3)]
    orphan = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 0"], dict(os.environ))  # no Popen
    try:
        wait_for(lambda: orphans._state(orphan) == "Z", 10, "the orphan to exit")
        skip = {p.pid for p in running}
        assert orphans._zombie_children(skip) == {orphan}
        for p in running:
            p.send_signal(signal.SIGKILL)
            p.wait()  # reaped by Popen: no longer our children
        assert orphans._zombie_children() == {orphan}
    finally:
        for p in running:
            p.kill()
            p.wait()
        os.waitpid(orphan, 0)


def test_a_tree_is_walked_through_its_own_proc_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The child, its children and a grandchild started from a second thread
    (the kernel lists a child under the thread that forked it) are all found,
    without psutil's scan of every process on the host (40-110 ms per stop
    at 1,000 programs); so is every member for kill_tree."""
    code = (
        "import subprocess, threading, time\n"
        "subprocess.Popen(['sleep', '60'])\n"
        "t = threading.Thread(target=lambda: subprocess.Popen(['sh', '-c', 'sleep 60 & wait']))\n"
        "t.start(); t.join(); time.sleep(60)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        expected = wait_for(
            lambda: len(d := psutil.Process(root.pid).children(recursive=True)) == 3 and d,
            WAIT,
            "the tree of four",
        )

        def no_scan() -> dict[int, int]:
            raise AssertionError("a scan of every process's stat file")

        with monkeypatch.context() as m:
            m.setattr(psutil, "_ppid_map", no_scan)
            tree = spawn.process_tree(root.pid)
            assert tree[0].pid == root.pid
            assert {p.pid for p in tree[1:]} == {p.pid for p in expected}
            assert spawn.process_tree(2**22 + 1) == []  # no such process
            assert spawn.kill_tree(tree[:1]) == 4  # the root; kill_tree finds the rest itself
        root.wait(WAIT)
        for proc in expected:
            wait_for(lambda p=proc: not p.is_running() or p.status() == "zombie", WAIT, "the end")
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()


# -- the config parse at a reload ---------------------------------------------------------------


def _config(tmp_path: Path, programs: dict[str, str]) -> Path:
    path = tmp_path / "app.toml"
    text = "".join(f'[programs.{name}]\ncommand = ["./{name}"]\n{extra}\n' for name, extra in
                   programs.items())  # fmt: skip
    path.write_text(text)
    return path


def _fresh(path: Path) -> Any:
    appconfig._SPECS.clear()
    try:
        return appconfig.load(path)
    except appconfig.ConfigError as exc:
        return exc.errors


def test_a_reparse_keeps_the_specs_of_unchanged_programs(tmp_path: Path) -> None:
    programs = {f"p{i}": f'environment = {{ N = "{i}" }}' for i in range(20)}
    first = appconfig.load(_config(tmp_path, programs))
    programs["p7"] = 'environment = { N = "changed" }'
    second = appconfig.load(path := _config(tmp_path, programs))
    for old, new in zip(first.programs, second.programs, strict=True):
        assert (new is old) == (new.name != "p7")
    assert second.program("p7").environment == {"N": "changed"}
    assert second == _fresh(path)  # the same config as a parse with nothing kept


def test_a_kept_spec_still_meets_a_later_clash(tmp_path: Path) -> None:
    """A kept program whose socket or config file another program now
    claims first is reported exactly as a parse with nothing kept does."""
    b = 'sockets = ["tcp://127.0.0.1:9100"]\n[[programs.b.config_files]]\npath = "b.yaml"\n'
    appconfig.load(_config(tmp_path, {"b": b}))
    a = 'sockets = ["tcp://127.0.0.1:9100"]\n[[programs.a.config_files]]\npath = "b.yaml"\n'
    path = _config(tmp_path, {"a": a, "b": b})
    appconfig.load(_config(tmp_path, {"b": b}))  # b is kept again
    path = _config(tmp_path, {"a": a, "b": b})
    try:
        appconfig.load(path)
        raise AssertionError("the clash was not reported")
    except appconfig.ConfigError as exc:
        kept = exc.errors
    assert kept == _fresh(path)
    assert any("programs.b.sockets[0]" in e for e in kept)
    assert any("programs.b.config_files[0].path" in e for e in kept)


def test_nesting_is_judged_as_before_without_a_path_per_value() -> None:
    def errors(text: str) -> list[str]:
        try:
            appconfig.loads(text, "/x/app.toml")
        except appconfig.ConfigError as exc:
            return exc.errors
        return []

    deep = appconfig.MAX_DEPTH
    assert errors("x = " + "[" * deep + "1" + "]" * deep) == [
        f"/x/app.toml: nested deeper than {deep} levels: x" + "[0]" * deep
    ]
    assert errors("x = " + "[" * deep + "]" * deep) == ["/x/app.toml: x: unknown key"]
    assert errors("x = " + "[" * (deep - 1) + "1" + "]" * (deep - 1)) == [
        "/x/app.toml: x: unknown key"
    ]


def test_the_start_and_a_reload_share_the_kept_specs(tmp_path: Path, monkeypatch: Any) -> None:
    """gosup loads ``app.toml`` as named on its command line, a reload by its
    absolute path: the same file, the same kept specs."""
    path = _config(tmp_path, {"a": "", "b": ""})
    monkeypatch.chdir(tmp_path)
    first = appconfig.load("app.toml")
    second = appconfig.load(path.resolve())
    assert all(new is old for old, new in zip(first.programs, second.programs, strict=True))
