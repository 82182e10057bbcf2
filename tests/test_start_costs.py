"""What a start costs the loop, taken down without changing what it does
(issue 18, "Loop lag under stress"): gosup's environment is decoded again only
when it changed, and the OOM-kill baseline of a run is read by the spawn
thread, just before its fork."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from test_program_unit import Harness, S, run

from supervisor.config import ProgramSpec, RestartPolicy
from supervisor.core import cgroup, spawn
from supervisor.core.program import Start


def test_the_base_environment_follows_gosups_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOSUP_TEST_A", "1")
    first = spawn.base_environment()
    assert first["GOSUP_TEST_A"] == "1"
    first["GOSUP_TEST_A"] = "changed by a caller"  # each caller has its own copy
    assert spawn.base_environment()["GOSUP_TEST_A"] == "1"
    monkeypatch.setenv("GOSUP_TEST_A", "2")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    again = spawn.base_environment()
    assert again["GOSUP_TEST_A"] == "2" and "NOTIFY_SOCKET" not in again
    monkeypatch.delenv("GOSUP_TEST_A")
    assert "GOSUP_TEST_A" not in spawn.base_environment()


def _counting_oom(monkeypatch: pytest.MonkeyPatch, value: int) -> list[str]:
    threads: list[str] = []

    def oom_kills() -> int:
        threads.append(threading.current_thread().name)
        return value

    monkeypatch.setattr(cgroup, "oom_kills", oom_kills)
    return threads


@pytest.mark.parametrize("at_once", [False, True])
def test_the_oom_baseline_is_read_where_the_fork_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_once: bool
) -> None:
    threads = _counting_oom(monkeypatch, 7)
    spec = ProgramSpec(name="t", command=("/bin/true",), directory=tmp_path)

    async def main() -> None:
        child, _ = await spawn.launch(spec, {}, at_once=at_once)
        try:
            await asyncio.wait_for(asyncio.shield(child.exited), 10)
        finally:
            for pipe in (child.stdout, child.stderr):
                pipe.close()
        if at_once:  # forked on the loop: the Program reads the count itself
            assert child.oom_kills_before is None and threads == []
        else:
            assert child.oom_kills_before == 7
            assert len(threads) == 1 and threads[0].startswith("gosup-spawn")

    asyncio.run(main())


@pytest.mark.parametrize(("before", "now", "oom"), [(4, 5, True), (5, 5, False), (None, 5, False)])
def test_a_sigkill_is_an_oom_kill_only_if_the_count_rose_since_the_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: int | None, now: int, oom: bool
) -> None:
    """``before``: what the spawn thread read (None: the Program reads it at the
    start, here already ``now``)."""
    _counting_oom(monkeypatch, now)

    async def body(h: Harness) -> None:
        launch = h._launch

        async def launcher(spec: ProgramSpec, env: dict[str, str], **kw: Any) -> tuple[Any, str]:
            child, digest = await launch(spec, env, **kw)
            child.oom_kills_before = before
            return child, digest

        h.program.ctx.launcher = launcher
        h.program.post(Start())
        await h.started(1)
        h.child.exit(-signal.SIGKILL)
        await h.until(lambda: h.program.state is S.EXITED, "exited")
        exited = h.records("exited")[0]
        assert ("crash" in exited and exited["crash"]["kind"] == "oom") is oom

    run(tmp_path, body, restart=RestartPolicy.NEVER)
