"""Where gosup forks (issue 18): a first start and a restart after a backoff
delay fork in gosup's spawn thread, so the loop never stands still while a
vforked child waits for a CPU to exec; a crash after a healthy run is
restarted at once from the loop's own thread, the fastest way. The kernel
says which: ``/proc/GOSUP/task/TID/children`` lists a child under the thread
that forked it. The parent-death signal belongs to that thread, so children
of the spawn thread must die with a SIGKILLed gosup too."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from conftest import pid_alive, wait_for


def _forked_by(gosup: int, child: int) -> int | None:
    """The thread of ``gosup`` whose children list holds ``child``."""
    for task in os.listdir(f"/proc/{gosup}/task"):
        try:
            with open(f"/proc/{gosup}/task/{task}/children") as f:
                if str(child) in f.read().split():
                    return int(task)
        except OSError:
            continue
    return None


def _program(name: str, goapp: Path) -> str:
    return (
        f'[programs.{name}]\ncommand = ["{goapp}", "-name", "{name}"]\n'
        'start_seconds = "100ms"\n'
        f'[programs.{name}.backoff]\nreset_after = "500ms"\n'
    )


def test_where_each_start_forks_and_all_die_with_gosup(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(_program("api", goapp) + _program("worker", goapp)).start()
    assert g.proc is not None
    gosup = g.proc.pid
    api, worker = g.running_pid("api"), g.running_pid("worker")
    up = time.monotonic()  # api is RUNNING from (at the latest) now
    for pid in (api, worker):
        thread = _forked_by(gosup, pid)
        assert thread is not None and thread != gosup, "a first start forks in the spawn thread"

    # A crash after a healthy run (longer than reset_after): restarted at once, from the loop.
    wait_for(lambda: time.monotonic() - up > 1.0, 10, "a run longer than reset_after")
    os.kill(api, 9)
    again = int(g.wait_event("running", "api", count=2)[-1]["pid"])
    assert _forked_by(gosup, again) == gosup, "a restart at once forks on the loop's thread"

    # A crash of a run shorter than reset_after: a backoff delay, then the spawn thread.
    os.kill(again, 9)
    third = int(g.wait_event("running", "api", count=3)[-1]["pid"])
    backoffs = [r for r in g.history(event="backoff") if r.get("program") == "api"]
    assert backoffs[-1]["delay_s"] > 0
    thread = _forked_by(gosup, third)
    assert thread is not None and thread != gosup

    # SIGKILL gosup: the children of both threads die with it (parent-death signal).
    g.proc.kill()
    g.proc.wait()
    for pid in (worker, third):
        wait_for(lambda p=pid: not pid_alive(p), 10, f"pid {pid} to die with gosup")
