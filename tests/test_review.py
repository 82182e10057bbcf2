"""Regression tests for bugs found reviewing the core (program, spawn, output, daemon).

Each test names the behaviour that was wrong; real processes where the bug
lives in the OS side, the fake-child harness where it is a state-machine bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from conftest import pid_alive, wait_for
from test_program_unit import Harness, run

from supervisor.config import BackoffSpec
from supervisor.core.program import Restart, Start
from supervisor.core.states import ProcessState

S = ProcessState


def program(name: str, argv: list[str], **keys: str) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f'[programs.{name}]\ncommand = {json.dumps(argv)}\nstart_seconds = "200ms"\n{extra}'


# -- a lingering descendant must not hold a kill back ------------------------------


def _lingering_grandchild(gosup_factory: Any, goapp: Path, tmp_path: Path, timeout: str) -> Any:
    """The main process exits on SIGTERM at once; its grandchild (same group) ignores it."""
    gpid_file = tmp_path / "grandchild.pid"
    argv = [str(goapp), "-grandchild", "-grandchild-pidfile", str(gpid_file)]
    g = gosup_factory(
        f'[supervisor]\nshutdown_timeout = "{timeout}"\n'
        + program("lingers", argv, stop_timeout='"60s"')
    ).start()
    g.running_pid("lingers")
    wait_for(lambda: gpid_file.exists() and gpid_file.read_text().strip(), what="grandchild")
    return g, int(gpid_file.read_text().split()[0])


def test_shutdown_timeout_kills_a_grandchild_outliving_its_parent(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    # Was: once the main process had exited, the actor sat in _finish_stop's wait
    # for the rest of stop_timeout (60 s) and the Kill sent at shutdown_timeout
    # (1 s) queued behind it: gosup took a minute to exit.
    g, grandchild = _lingering_grandchild(gosup_factory, goapp, tmp_path, "1s")
    began = time.monotonic()
    assert g.stop(timeout=40) == 0
    assert time.monotonic() - began < 20
    assert not pid_alive(grandchild)
    assert g.history("lingers", "stopped")[0]["killed"] is True


def test_second_sigint_kills_a_grandchild_outliving_its_parent(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    g, grandchild = _lingering_grandchild(gosup_factory, goapp, tmp_path, "5m")
    main = g.running_pid("lingers")
    g.proc.send_signal(signal.SIGINT)
    wait_for(lambda: not pid_alive(main), what="the parent gone, its grandchild lingering")
    assert pid_alive(grandchild)
    began = time.monotonic()
    g.proc.send_signal(signal.SIGINT)
    assert g.proc.wait(40) == 0
    assert time.monotonic() - began < 20
    assert not pid_alive(grandchild)


# -- exit classification -------------------------------------------------------------


def test_death_by_an_unnamed_signal_is_recorded_and_restarted(gosup_factory: Any) -> None:
    # Was: signal.Signals(40) raised ValueError inside _on_exit, the program stayed
    # RUNNING with a dead child forever, and the stop at shutdown never finished.
    argv = [sys.executable, "-c", "import os, time; time.sleep(0.3); os.kill(os.getpid(), 40)"]
    g = gosup_factory(
        program("rt", argv, restart='"always"')
        + '[programs.rt.backoff]\ninitial = "50ms"\njitter = 0.0\n'
    ).start()
    exits = g.wait_event("exited", "rt")
    assert exits[0]["signal"] == f"SIGRTMIN+{40 - signal.SIGRTMIN}"
    assert exits[0]["exit_code"] is None
    g.wait_event("started", "rt", count=2)
    assert g.stop(timeout=30) == 0


# -- backoff accounting ----------------------------------------------------------------


def test_healthy_run_ended_by_a_requested_restart_resets_the_failures(tmp_path: Path) -> None:
    # Was: only a *crash* after a healthy run reset the count, so a run that lasted
    # hours and ended in a leak restart kept the old count: the next single crash
    # went FATAL (give_up_after=2 here) instead of backing off from `initial`.
    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        h.child.exit(1)  # failures = 1
        await h.until(lambda: h.program.state is S.BACKOFF, "backoff")
        await h.advance(1.0)
        await h.started(2)
        await h.advance(5.0)
        assert h.program.state is S.RUNNING
        await h.advance(3600.0)  # an hour of health
        reply = asyncio.ensure_future(h.program.request(Restart(reason="leak")))
        await h.started(3)
        await h.advance(5.0)
        await h.answer(reply, "the leak restart")
        assert h.records("started")[-1]["attempt"] == 1
        h.child.exit(1)  # one crash soon after: the first of a new series
        await h.until(lambda: h.program.state in (S.BACKOFF, S.FATAL), "the exit settled")
        assert h.program.state is S.BACKOFF
        assert h.records("backoff")[-1]["delay_s"] == 1.0

    spec = BackoffSpec(initial=1.0, max=8.0, jitter=0.0, reset_after=60.0, give_up_after=2)
    run(tmp_path, body, backoff=spec, start_seconds=5.0)


# -- a crashed program's escaped helpers -----------------------------------------------


def test_escaped_helper_of_a_crashed_run_does_not_outlive_it(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    # The helper called setsid: it is not in the crashed child's group, and the
    # child's tree cannot be taken once the child is gone. It is found by the
    # GOSUP_STATE_DIR/GOSUP_PROGRAM marks every child inherits.
    gpid_file = tmp_path / "grandchild.pid"
    argv = [str(goapp), "-mode", "exit", "-code", "1", "-after", "300ms", "-grandchild"]
    argv += ["-grandchild-setsid", "-grandchild-pidfile", str(gpid_file)]
    g = gosup_factory(
        program("crashy", argv) + "[programs.crashy.backoff]\ngive_up_after = 1\n"
    ).start()
    g.wait_event("fatal", "crashy")
    grandchild = int(gpid_file.read_text().split()[0])
    try:
        wait_for(lambda: not pid_alive(grandchild), what="the escaped helper swept")
    finally:
        assert g.stop() == 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)  # a failure must leave nothing behind
