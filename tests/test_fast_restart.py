"""A healthy run's crash is back at once (issue 18): nothing that can wait
stands between the child's death and the next exec.

What a crashed run left behind (helpers that left its group, found by a scan
of the process table) is still killed, but beside the replacement, not
before it; and the sweep never touches the replacement or what it starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import pid_alive, wait_for
from test_program_unit import FAST, WAIT, Harness, run

from supervisor.core import spawn
from supervisor.core.program import Start, Stop
from supervisor.core.states import ProcessState

S = ProcessState


def _blocking_scan(calls: list[str], release: threading.Event) -> Any:
    def scan(name: str) -> list[Any]:  # the scan of the process table, held up
        calls.append(name)
        release.wait(3 * WAIT)
        return []

    return scan


def test_the_restart_after_a_healthy_run_does_not_wait_for_the_sweep(tmp_path: Path) -> None:
    calls: list[str] = []
    release = threading.Event()

    async def body(h: Harness) -> None:
        h.program.ctx.marked_escapees = _blocking_scan(calls, release)
        h.program.post(Start())
        await h.started(1)
        await h.advance(5.0)  # RUNNING
        await h.advance(60.0)  # healthy for reset_after
        try:
            h.child.exit(-signal.SIGKILL)
            await h.started(2)  # while the scan of the crashed run's leftovers is held up
            await h.until(lambda: calls == ["api"], "the sweep began")
            assert h.program._sweeps, "the sweep runs beside the new run"
        finally:
            release.set()
        await h.until(lambda: not h.program._sweeps, "the sweep ended")
        assert h.records("backoff")[-1]["delay_s"] == 0.0

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)


def test_a_failed_run_is_swept_before_the_next_start(tmp_path: Path) -> None:
    calls: list[str] = []
    release = threading.Event()

    async def body(h: Harness) -> None:
        h.program.ctx.marked_escapees = _blocking_scan(calls, release)
        h.program.post(Start())
        await h.started(1)
        try:
            h.child.exit(1)  # a failed start: backoff, and the sweep comes first
            await h.until(lambda: calls == ["api"], "the sweep began")
            assert h.program.state is S.EXITED and len(h.children) == 1
        finally:
            release.set()
        await h.until(lambda: h.program.state is S.BACKOFF, "backoff")
        await h.advance(1.0)
        await h.started(2)

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)


def test_a_command_before_the_restart_waits_for_the_sweep(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        swept: list[str] = []
        h.program.ctx.marked_escapees = lambda name: swept.append(name) or []

        def stop_in_backoff(program: Any, old: ProcessState, new: ProcessState) -> None:
            if new is S.BACKOFF:  # a stop queued before the restart at once
                program.post(Stop())

        h.program.post(Start())
        await h.started(1)
        await h.advance(65.0)
        h.program.state_listeners.append(stop_in_backoff)
        h.child.exit(-signal.SIGKILL)
        await h.until(lambda: h.program.state is S.STOPPED, "stopped")
        await h.until(lambda: not h.program._sweeps, "the sweep ended")
        assert swept == ["api"]
        # The replacement was started before the exit's bookkeeping (and so
        # before the stop queued during it): the stop then stopped it.
        assert len(h.children) == 2 and not h.children[1].alive()

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)


def test_a_crash_that_can_have_left_nothing_is_not_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subreaper gosup skips the sweep's thread hop when the run's group is
    empty and it has no child it did not start; a stray child, or a gosup
    that adopts nothing (its leftovers can be anywhere), still sweeps."""
    strays = [False]
    monkeypatch.setattr(spawn, "strays", lambda: strays[0])

    async def body(h: Harness) -> None:
        swept: list[str] = []
        adopts = [True]
        h.program.ctx.marked_escapees = lambda name: swept.append(name) or []
        h.program.ctx.adopts = lambda: adopts[0]
        h.program.post(Start())
        for n, (adopting, stray, sweeps) in enumerate(
            [(True, False, 0), (True, True, 1), (False, False, 2), (True, False, 2)], start=1
        ):
            adopts[0], strays[0] = adopting, stray
            await h.started(n)
            h.child.exit(1)  # a failed start: swept (or not) before the backoff
            await h.until(lambda: h.program.state in (S.BACKOFF, S.FATAL), f"backoff #{n}")
            assert len(swept) == sweeps, (n, swept)
            await h.advance(60.0)  # past any backoff

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)


def test_started_before_leaves_out_what_starts_from_the_tick_on() -> None:
    me = psutil.Process()
    ticks = spawn.start_ticks()
    later = subprocess.Popen(["sleep", "30"])
    try:
        assert spawn.started_before([me, psutil.Process(later.pid)], ticks) == [me]
    finally:
        later.kill()
        later.wait()


def _program(goapp: Path, gc_pidfile: Path) -> str:
    argv = [str(goapp), "-mode", "serve", "-grandchild", "-grandchild-setsid"]
    argv += ["-grandchild-pidfile", str(gc_pidfile)]
    args = ", ".join(f'"{a}"' for a in argv)
    return (
        f'[programs.api]\ncommand = [{args}]\nstart_seconds = "100ms"\n'
        '[programs.api.backoff]\nreset_after = "500ms"\n'
    )


def _pid_in(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(path.read_text().split()[0])
    return None


def test_the_crashed_runs_escaped_helper_goes_and_the_new_runs_stays(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    # goapp starts a helper in a session of its own (setsid): it is neither in
    # the child's group nor, once the child is dead, in its tree.
    gc_pidfile = tmp_path / "helper.pid"
    g = gosup_factory(_program(goapp, gc_pidfile)).start()
    helpers: list[int] = []
    try:
        pid = g.running_pid("api")
        helpers.append(wait_for(lambda: _pid_in(gc_pidfile), what="the first run's helper"))
        since = time.monotonic()
        wait_for(lambda: time.monotonic() - since > 1.0, what="a run older than reset_after")
        os.kill(pid, signal.SIGKILL)
        g.wait_event("started", "api", count=2)
        helpers.append(
            wait_for(lambda: (p := _pid_in(gc_pidfile)) != helpers[0] and p, what="the new helper")
        )
        assert g.history("api", "backoff")[-1]["delay_s"] == 0.0  # back at once
        wait_for(lambda: not pid_alive(helpers[0]), what="the crashed run's helper swept")
        assert pid_alive(helpers[1]), "the sweep killed the new run's helper"
        assert g.wait_event("running", "api", count=2)[-1]["pid"] != pid
    finally:
        assert g.stop() == 0
        for helper in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)
