"""A program's readiness and liveness probes: decide, then tell the Program.

One task per program with a ``[ready]`` or ``[live]`` section follows its
runs. While a run is STARTING the readiness probe is tried every
``interval``: the first pass is ``Ready(pid)``; still failing ``within``
after the start is ``probe_failed`` (probe ready) and ``NotReady(pid)``, a
failed start the Program backs off from. While RUNNING the liveness probe is
tried every ``interval``; ``failures`` failures in a row (a Go server whose
handlers hang, its process alive) are ``probe_failed`` (probe live), then
evidence, then ``Restart(reason="unhealthy", pid)``, carried out by the
Program's own task like a leak restart.

``[ready] notify = true`` is not tried every interval: the run says
``READY=1`` itself over sd_notify (core/notify.py), and the wait for it is
one await, on that run's pid only, until ``within``. The probes' ``{pid}``
is the run being probed (the replacement's while an overlap restart starts
it), here and in ConfigSync's probes (``pid_probers``).

Evidence for a hung program: a pprof goroutine dump is tried first when the
program has ``go_metrics`` and ``evidence = "pprof"`` (the default), but a
server whose handlers hang often cannot serve pprof either, so when that
fails the restart stops the child with SIGQUIT and its stderr is kept as the
dump: the Go runtime writes every goroutine's stack, showing where it hung.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from loguru import logger

from supervisor.config import Evidence, ProbeKind, ProbeSpec, ProgramSpec
from supervisor.core.notify import NotifySocket
from supervisor.core.program import CommandError, NotReady, Program, Ready, Restart
from supervisor.core.states import ProcessState
from supervisor.core.tasks import cancel_and_wait
from supervisor.health.evidence import Dumps
from supervisor.health.gohttp import ScrapeError
from supervisor.health.probes import Prober
from supervisor.history import History

S = ProcessState
PPROF_TIMEOUT = 3.0  # a hung server rarely answers pprof: do not hold the restart long
SPAWN_POLL = 0.02  # STARTING without a pid yet: the spawn is under way


class ProbeWatch:
    """The attachment that probes one program (service/app.py wires it)."""

    holds_autostart = False

    def __init__(
        self, history: History, program: Program, dumps: Dumps, notify: NotifySocket | None
    ) -> None:
        self.history = history
        self.program = program
        self.dumps = dumps
        self.notify = notify
        spec = program.spec
        self.ready = Prober(spec.ready, spec) if spec.ready else None
        self.live = Prober(spec.live, spec) if spec.live else None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.program.state_listeners.append(self._on_state)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"probes:{self.program.name}"
        )

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.program.state_listeners.remove(self._on_state)
        await cancel_and_wait(self._task)
        for prober in (self.ready, self.live):
            if prober is not None:
                await prober.aclose()

    def _on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
        self._changed.set()

    # -- following the runs ----------------------------------------------------

    async def _run(self) -> None:
        program = self.program
        while True:
            self._changed.clear()
            pid = program.pid
            try:
                if program.state is S.STARTING and self.ready and pid is not None:
                    await self._readiness(pid, self.ready)
                elif program.state is S.RUNNING and self.live and pid is not None:
                    await self._liveness(pid, self.live)
                elif program.state is S.STARTING and self.ready:
                    # STARTING is entered before the child exists (the spawn is
                    # awaited): look again shortly, no state change will say so.
                    await self._pause(SPAWN_POLL)
                else:
                    await self._changed.wait()
            except Exception as exc:  # a bug: log it, keep probing the next run
                logger.opt(exception=exc).error("{}: probe internal error", program.name)
                await self._changed.wait()

    def _same_run(self, pid: int, state: ProcessState) -> bool:
        return self.program.pid == pid and self.program.state is state

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less when the program's state changes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(seconds, 0.0)):
                await self._changed.wait()

    async def _readiness(self, pid: int, prober: Prober) -> None:
        program, spec = self.program, prober.probe
        clock = program.ctx.clock
        began = program.started_at or clock()
        if spec.kind is ProbeKind.NOTIFY:
            await self._notified(pid, spec, began)
            return
        failures = 0
        while self._same_run(pid, S.STARTING):
            tried_at = clock()
            error = await prober.run(pid)
            if not self._same_run(pid, S.STARTING):
                return
            if error is None:
                await program.request(Ready(pid=pid))
                return
            failures += 1
            if clock() - began >= spec.within:
                self._failed("ready", spec, error, failures)
                await program.request(NotReady(pid=pid, error=error))
                return
            await self._pause(tried_at + spec.interval - clock())

    async def _notified(self, pid: int, spec: ProbeSpec, began: float) -> None:
        """Wait for READY=1 from ``pid`` itself, until ``within`` or the run ends."""
        program, notify = self.program, self.notify
        assert notify is not None  # the composition root hands it to every ProbeWatch
        ready = asyncio.ensure_future(notify.wait_ready(pid))
        try:
            while self._same_run(pid, S.STARTING) and not ready.done():
                left = began + spec.within - program.ctx.clock()
                if left <= 0:
                    said = notify.status_of(pid)
                    error = f"no READY=1 from pid {pid} within {spec.within:g}s"
                    error += f" (last STATUS: {said!r})" if said else ""
                    self._failed("ready", spec, error, 1)
                    await program.request(NotReady(pid=pid, error=error))
                    return
                changed = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({ready, changed}, timeout=left, return_when="FIRST_COMPLETED")
                await cancel_and_wait(changed)
                self._changed.clear()
            if ready.done() and self._same_run(pid, S.STARTING):
                await program.request(Ready(pid=pid))
        finally:
            await cancel_and_wait(ready)

    async def _liveness(self, pid: int, prober: Prober) -> None:
        program, spec = self.program, prober.probe
        clock = program.ctx.clock
        failures = 0
        await self._pause(spec.interval)  # it just got ready: first look one interval on
        while self._same_run(pid, S.RUNNING):
            tried_at = clock()
            error = await prober.run(pid)
            if not self._same_run(pid, S.RUNNING):
                return
            if error is None:
                failures = 0
            else:
                failures += 1
            program.observations.live_failures = failures
            if failures >= spec.failures:
                assert error is not None
                program.observations.live_failures = 0
                self._failed("live", spec, error, failures)
                await self._restart_unhealthy(pid)
                return
            await self._pause(tried_at + spec.interval - clock())

    def _failed(self, probe: str, spec: ProbeSpec, error: str, failures: int) -> None:
        name = self.program.name
        target = spec.describe()
        self.history.record(
            "probe_failed", name, probe=probe, target=target, error=error, failures=failures
        )
        self.program.observations.probe_failed = {"probe": probe, "error": error}
        logger.warning("{}: {} probe failed {} times: {}", name, probe, failures, error)

    # -- an unhealthy program ------------------------------------------------------

    async def _restart_unhealthy(self, pid: int) -> None:
        """probe_failed -> evidence -> Restart(unhealthy), SIGQUIT when pprof gave nothing."""
        program = self.program
        limits = program.spec.limits
        kind = limits.evidence if limits else Evidence.SIGQUIT
        use_sigquit = kind is Evidence.SIGQUIT
        if kind is Evidence.PPROF:
            use_sigquit = not await self._pprof_dump()
        if program.pid != pid:
            return  # it went by itself meanwhile: the Program handles that exit
        try:
            if use_sigquit:
                await self.dumps.restart_with_sigquit(program, pid, "unhealthy", reason="unhealthy")
            else:
                await program.request(Restart(reason="unhealthy", pid=pid))
        except CommandError as exc:
            logger.warning("{}: unhealthy restart: {}", program.name, exc)

    async def _pprof_dump(self) -> bool:
        limits = self.program.spec.limits
        if limits is None or limits.go_metrics is None:
            return False
        name = self.program.name
        try:
            path = await self.dumps.fetch_goroutines(name, limits.go_metrics, limits, PPROF_TIMEOUT)
        except (ScrapeError, OSError) as exc:
            self.dumps.failed(name, "pprof", f"{exc}; a SIGQUIT dump instead")
            return False
        return await self.dumps.record(name, path, "pprof", limits.dump_keep, reason="unhealthy")


def build_for(
    history: History, program: Program, dumps: Dumps, notify: NotifySocket | None
) -> ProbeWatch | None:
    """The attachment for ``program``, or None when it has no probes."""
    spec = program.spec
    if spec.ready is None and spec.live is None:
        return None
    return ProbeWatch(history, program, dumps, notify)


class PidProber:
    """A Prober whose ``{pid}`` is the program's current run (ConfigSync's
    confirm and ready probes, which do not follow runs themselves)."""

    def __init__(self, probe: ProbeSpec, spec: ProgramSpec, program: Program) -> None:
        self._prober = Prober(probe, spec)
        self._program = program

    async def run(self) -> str | None:
        return await self._prober.run(self._program.pid)

    async def aclose(self) -> None:
        await self._prober.aclose()


def pid_probers(program: Program) -> Callable[[ProbeSpec, ProgramSpec], PidProber]:
    """The prober factory for ``program``'s config files (files/probation.py)."""
    return lambda probe, spec: PidProber(probe, spec, program)
