"""The composition root (supervisor/service/app.py) and the daemon's loud faults."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from supervisor import config as configmod
from supervisor.core import spawn
from supervisor.core.notify import NotifySocket
from supervisor.core.program import Stop
from supervisor.core.states import ProcessState as S
from supervisor.health.resources import ResourceSampler
from supervisor.service import app, control, metrics, orphans, systemd


def load(tmp_path: Path, goapp: Path, extra: str = "") -> configmod.AppConfig:
    text = (
        f'[supervisor]\nstate_dir = "state"\n{extra}\n'
        f'[programs.a]\ncommand = ["{goapp}"]\nstart_seconds = "50ms"\n'
    )
    return configmod.loads(text, tmp_path / "app.toml")


def test_build_names_every_part_in_order(tmp_path: Path, goapp: Path) -> None:
    sup = app.build(load(tmp_path, goapp))
    kinds = [type(s) for s in sup.services]
    expected = [control.ControlServer, NotifySocket, ResourceSampler, orphans.OrphanService]
    assert kinds == expected
    assert "dump" in sup.services[0].handlers  # type: ignore[attr-defined]
    sup.history.close()

    sup = app.build(load(tmp_path, goapp, 'metrics_listen = "127.0.0.1:19109"'))
    assert metrics.MetricsServer in [type(s) for s in sup.services]
    sup.history.close()


def test_building_changes_no_environment(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv(spawn.PROGRAM_VAR, "outer")
    before = dict(os.environ)
    config = load(tmp_path, goapp)
    sup = app.build(config)
    assert dict(os.environ) == before
    env = sup.ctx.extra_env(config.programs[0])
    child = spawn.child_environment(config.programs[0], None, env)
    assert "NOTIFY_SOCKET" not in child
    assert child[spawn.PROGRAM_VAR] == "a"  # ours, not the outer gosup's
    assert child[spawn.STATE_DIR_VAR] == str(config.supervisor.state_dir.resolve())
    notify = [s for s in sup.services if isinstance(s, systemd.SystemdService)]
    assert len(notify) == 1  # NOTIFY_SOCKET is set: sd_notify is wired in
    notify[0].notifier.close()
    sup.history.close()


def test_config_sync_attaches_only_to_programs_with_config_files(
    tmp_path: Path, goapp: Path
) -> None:
    sup = app.build(load(tmp_path, goapp))
    factory = sup.attachment_factories[0]

    class P:  # what the factory reads of a program
        spec = sup.config.programs[0]

    assert factory(sup, P()) is None  # type: ignore[arg-type]
    sup.history.close()


def test_a_removed_listener_is_not_called_and_a_failing_one_is_logged(
    tmp_path: Path, goapp: Path
) -> None:
    seen: list[tuple[str, Any, Any]] = []
    errors: list[str] = []
    running = asyncio.Event()

    def good(program: Any, old: Any, new: Any) -> None:
        seen.append((program.name, old, new))
        if new is S.RUNNING:
            running.set()

    def bad(program: Any, old: Any, new: Any) -> None:
        raise RuntimeError("listener bug")

    async def main() -> None:
        sup = app.build(load(tmp_path, goapp))
        sink = logger.add(lambda m: errors.append(str(m)), level="ERROR")
        sup.state_listeners += [bad, good]
        program = await sup._add_program(sup.config.programs[0])
        try:
            async with asyncio.timeout(20):
                await running.wait()
            assert (("a", S.STARTING, S.RUNNING)) in seen
            assert any("listener bug" in e and "Traceback" in e for e in errors)
            sup.state_listeners.remove(good)  # a service closing
            n = len(seen)
            await program.request(Stop(reason="test", join=True))
            assert len(seen) == n  # not called after its removal
        finally:
            await program.request(Stop(reason="test", join=True))
            await program.close()
            logger.remove(sink)
            sup.history.close()

    asyncio.run(main())


def test_cancel_and_wait_never_swallows_the_callers_cancellation() -> None:
    """A part closed by a shutdown that is itself cancelled must end: the old
    ``cancel(); with suppress(CancelledError): await task`` swallowed the
    caller's cancellation when it came while the task was still cleaning up
    (a shutdown then waited forever, seen as 'gosup did not stop')."""
    from supervisor.core.tasks import cancel_and_wait

    async def main(swallowing: bool) -> str:
        cleaning, release = asyncio.Event(), asyncio.Event()

        async def slow_to_end() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                cleaning.set()
                await asyncio.shield(release.wait())  # cleanup that takes a moment

        async def closer(task: asyncio.Task[None]) -> str:
            if swallowing:  # the pattern the helper replaces
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            else:
                await cancel_and_wait(task)
            return "went on"

        task = asyncio.create_task(slow_to_end())
        await asyncio.sleep(0)  # it runs up to its sleep
        outer = asyncio.create_task(closer(task))
        await cleaning.wait()  # the closer cancelled it; it cleans up
        outer.cancel()  # the caller is cancelled while the task cleans up
        release.set()
        try:
            return await outer
        except asyncio.CancelledError:
            return "cancelled"
        finally:
            await asyncio.gather(task, return_exceptions=True)

    assert asyncio.run(main(swallowing=True)) == "went on"  # the defect
    assert asyncio.run(main(swallowing=False)) == "cancelled"
