"""A crash after a healthy run restarts first and records after (issue 18).

The replacement's Popen comes before the exit's bookkeeping (the drain of the
crashed run's output, its crash reading, the records, the state listeners),
but the history must read exactly as before: ``exited`` (with what the
crashed run said), ``backoff`` (delay 0), then ``started``. These tests read
the file in order, with real Go children."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

from test_program_unit import FAST, Harness, run

from supervisor.core.program import Start
from supervisor.core.states import ProcessState

S = ProcessState


def program(name: str, binary: Path, *args: str) -> str:
    """``running`` is written after reset_after: a crash from then on is after a healthy run."""
    argv = ", ".join(f'"{a}"' for a in (str(binary), *args))
    return (
        f'[programs.{name}]\ncommand = [{argv}]\nstart_seconds = "400ms"\n'
        f'[programs.{name}.backoff]\ninitial = "20s"\nreset_after = "300ms"\njitter = 0.0\n'
    )


def events(g: Any, name: str) -> list[str]:
    return [r["event"] for r in g.history(name)]


def test_a_go_panic_after_a_healthy_run_is_recorded_then_started(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(program("api", goapp, "-mode", "panic", "-after", "700ms")).start()
    starts = g.wait_event("started", "api", count=3, timeout=30)
    assert events(g, "api")[:7] == [
        "started",
        "running",
        "exited",
        "backoff",
        "started",
        "running",
        "exited",
    ]
    exited = g.history("api", "exited")[0]
    # the crash was read from the crashed run's stderr, not the replacement's
    assert exited["crash"]["kind"] == "panic"
    assert exited["crash"]["message"] == "boom: fixture panic"
    assert exited["pid"] == starts[0]["pid"]
    assert exited["uptime_s"] >= 0.3
    backoff = g.history("api", "backoff")[0]
    assert backoff == {**backoff, "attempt": 1, "delay_s": 0.0}
    assert starts[1]["attempt"] == 1 and starts[1]["pid"] != starts[0]["pid"]
    assert g.stop() == 0


def test_a_sigkill_after_a_healthy_run_restarts_with_the_same_records(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(program("api", goapp, "-stderr-line", "hello")).start()
    first = g.wait_event("running", "api")[0]
    os.kill(first["pid"], signal.SIGKILL)
    second = g.wait_event("started", "api", count=2)[1]
    records = g.history("api")
    order = [r["event"] for r in records][:5]
    assert order == ["started", "running", "exited", "backoff", "started"]
    exited = records[2]
    assert exited == {**exited, "pid": first["pid"], "signal": "SIGKILL", "exit_code": None}
    assert "crash" not in exited  # no OOM kill in the cgroup: a plain SIGKILL
    assert second["pid"] != first["pid"]
    g.wait_event("running", "api", count=2)  # the replacement is RUNNING
    assert g.stop() == 0


def test_a_replacement_that_cannot_start_is_recorded_after_the_crash(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    binary = tmp_path / "bin" / "app"
    binary.parent.mkdir()
    shutil.copy2(goapp, binary)
    g = gosup_factory(program("api", binary, "-mode", "exit", "-code", "3", "-after", "700ms"))
    g.start()
    g.wait_event("running", "api")
    binary.unlink()  # the restart at once finds no binary
    g.wait_event("backoff", "api", count=2, timeout=30)
    records = g.history("api")
    assert [r["event"] for r in records][:6] == [
        "started",
        "running",
        "exited",
        "backoff",
        "exited",
        "backoff",
    ]
    crash, failed = records[2], records[4]
    assert crash["exit_code"] == 3 and crash["uptime_s"] >= 0.3
    assert records[3]["delay_s"] == 0.0
    assert failed["pid"] is None and "not found" in failed["error"]
    assert records[5]["delay_s"] == 20.0  # a failed start backs off by `initial`
    assert g.stop() == 0


def test_the_replacement_is_launched_before_the_crash_is_recorded(tmp_path: Path) -> None:
    """The order inside gosup (fake children, a fake clock): at the moment the
    launcher runs for the restart at once, the crash is not yet in the history;
    a crash after a failed run still writes its records first."""
    seen: list[list[str]] = []  # the history's events when each launch began
    on_loop: list[bool] = []  # each launch's at_once: forked on the loop's thread

    async def body(h: Harness) -> None:
        launch = h._launch

        async def spying(spec: Any, env: dict[str, str], *, at_once: bool) -> tuple[Any, str]:
            seen.append([r["event"] for r in h.records()] if h.history_path.exists() else [])
            on_loop.append(at_once)
            return await launch(spec, env)

        h.program.ctx.launcher = spying
        h.program.post(Start())
        await h.started(1)
        await h.advance(65.0)  # RUNNING, and healthy for reset_after (60 s)
        h.child.exit(-signal.SIGKILL)
        await h.started(2)
        h.child.exit(1)  # within start_seconds: a failed run, records first
        await h.until(lambda: h.program.state is S.BACKOFF, "backoff")
        await h.advance(1.0)
        await h.started(3)
        assert [r["event"] for r in h.records()] == [
            "started",
            "running",
            "exited",
            "backoff",
            "started",
            "exited",
            "backoff",
            "started",
        ]

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)
    assert seen[1] == ["started", "running"]  # launched before exited and backoff
    assert seen[2][-2:] == ["exited", "backoff"]
    # Only the restart at once forks on the loop; the first start and the
    # restart after a backoff delay fork in the spawn thread.
    assert on_loop == [False, True, False]
