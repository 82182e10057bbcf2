"""The verdict on one version of one config file: the program's, not the file system's.

After the swap (docs/config-files.md, "The verdict"): tell the program
(``reload_command``, else ``reload_signal``; or a restart), wait until the
run that reads the version is RUNNING (so its readiness probe passed), then
keep it on probation for ``probation``: ``confirm`` is probed every
interval, and at the end ``confirm`` and the readiness probe must pass once
more. Only then is the version confirmed. Anything else fails it, with one
of ``REASONS``.

Two parts decide, and the first to decide wins:

* ``Probation.run``, awaited by the file's worker task: the reload command's
  exit code, the waits and the probes (``reload_failed``, ``unconfirmed``,
  ``not_ready``);
* ``Probation.on_state``, called from the program's state listener during the
  transition: an exit (``exited``, or ``not_ready`` for a failed start) and
  a liveness restart (``unhealthy``). These must be decided there, before
  the program's task starts the next run, so that the next run reads the
  restored file (configsync.py explains the race).

The probes are handed in (``ProberFactory``, wired by service/app.py with
health's probers): files/ does not import health/.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from supervisor.config import OnChange, ProbeSpec, ProgramSpec
from supervisor.core.program import CommandError, Program, Restart, RestartFailed, SendSignal
from supervisor.core.states import ProcessState
from supervisor.core.tasks import cancel_and_wait
from supervisor.files.validator import Verdict
from supervisor.history import History
from supervisor.protocol import RELOAD_COMMAND_TIMEOUT

S = ProcessState
REASONS = ("reload_failed", "unconfirmed", "not_ready", "unhealthy", "exited")
RELOAD_TIMEOUT = RELOAD_COMMAND_TIMEOUT
SETTLE_MARGIN = 5.0  # beyond the program's own start budget, how long to wait for RUNNING
FINAL_TRIES = 3  # attempts (one interval apart) a final confirm/ready check gets


class ProbeRunner(Protocol):
    """One probe of one program (health.probes.Prober): None when it passes."""

    async def run(self) -> str | None: ...

    async def aclose(self) -> None: ...


ProberFactory = Callable[[ProbeSpec, ProgramSpec], ProbeRunner]


class Owner(Protocol):
    """What a probation needs from its file's ConfigSync."""

    program: Program
    history: History

    async def settled_state(self) -> ProcessState: ...

    async def state_change(self) -> None: ...

    async def run_reload_command(self, pid: int) -> Verdict: ...

    def exit_summary(self) -> str: ...


@dataclass
class Failure:
    reason: str  # one of REASONS
    detail: str  # what failed, for people: an exit summary, a probe's error ...
    extra: dict[str, Any] = field(default_factory=dict)  # exit_code, output_tail
    # The run that serves never took the version (an overlap replacement failed
    # and the old process, started before the swap, serves on): after the
    # rollback there is nothing to tell it.
    untouched: bool = False


class Abandoned(Exception):
    """No verdict: the program was stopped, or is not running to be judged."""


class Probation:
    """One version on probation; ``run`` returns None (confirmed) or a Failure."""

    def __init__(self, sync: Owner, sha: str, on_change: OnChange, probation: float) -> None:
        self.sync = sync
        self.sha = sha
        self.on_change = on_change
        self.probation = probation
        self.pid: int | None = None  # the run being judged, once it runs
        self.failure: Failure | None = None  # decided by on_state
        self.ended = asyncio.Event()  # on_state decided (failure) or abandoned it
        self.abandoned = False
        self.restart: asyncio.Future[str] | None = None  # on_change = "restart": its outcome

    # -- the state listener's side ----------------------------------------------

    def on_state(self, old: ProcessState, new: ProcessState) -> Failure | None:
        """A failure this transition means for the version (decided once)."""
        if self.ended.is_set():
            return None
        program = self.sync.program
        failure = None
        if new is S.STOPPING and "unhealthy" in program.stop_reason:
            failure = Failure("unhealthy", "the liveness probe failed during probation")
        elif new is S.EXITED:
            reason = (program.last_exit or {}).get("reason")
            summary = self.sync.exit_summary()
            if reason == "not_ready":
                failure = Failure("not_ready", f"not ready ({summary})")
            elif reason == "unhealthy":
                failure = Failure("unhealthy", f"unhealthy ({summary})")
            else:
                failure = Failure("exited", f"exited within probation ({summary})")
        elif new is S.STOPPED and not program.stop_reason.startswith("restart"):
            self.abandoned = True  # an operator's stop: nothing left to judge
            self.ended.set()
        if failure is not None:
            self.failure = failure
            self.ended.set()
        return failure

    # -- the worker's side ---------------------------------------------------------

    async def run(
        self,
        make_prober: ProberFactory,
        confirm: ProbeSpec | None,
        newer: Callable[[], Coroutine[Any, Any, bool]] | None = None,
    ) -> Failure | None:
        """Tell the program, then judge; a Failure, None for confirmed.

        Raises Abandoned when there is nothing to judge: the program was
        stopped, or ``newer`` (asked when the state changes... or the file's
        worker is woken) says a newer version is waiting, which supersedes
        this one without a verdict."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._judge(make_prober, confirm))
        ended = loop.create_task(self.ended.wait())
        woke: asyncio.Task[bool] | None = loop.create_task(newer()) if newer else None
        try:
            while True:
                waits = {task, ended} | ({woke} if woke is not None else set())
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if woke is None or woke not in done or task in done or ended in done:
                    break
                if woke.result():
                    raise Abandoned("superseded by a newer version")
                assert newer is not None
                woke = loop.create_task(newer())
        finally:
            await cancel_and_wait(task, ended, woke, expected=(Abandoned,))
        if self.abandoned:
            raise Abandoned("the program was stopped during probation")
        if self.failure is not None:
            return self.failure
        return task.result()

    async def _judge(self, make_prober: ProberFactory, confirm: ProbeSpec | None) -> Failure | None:
        program = self.sync.program
        if self.on_change is OnChange.NONE:  # the program reads it at its next start
            raise Abandoned("on_change = none: the next run that stays up confirms it")
        state = await self.sync.settled_state()
        new_run = False
        if state is S.RUNNING:
            failure = await self.tell()
            if failure is not None:
                return failure
            new_run = self.on_change is OnChange.RESTART
        elif state not in (S.BACKOFF, S.STARTING):
            raise Abandoned(f"{program.name} is {state.value.lower()}: judged when it next runs")
        old_pid = program.pid if new_run else None
        if not await self._running(old_pid):
            if (failed := self._restart_failed()) is not None:
                return failed
            return Failure("not_ready", "the program did not get to RUNNING")
        self.pid = program.pid
        return await self._watch(make_prober, confirm)

    async def tell(self) -> Failure | None:
        """Reload (command or signal) or restart the program, by ``on_change``."""
        program = self.sync.program
        spec = program.spec
        pid = program.pid
        try:
            if self.on_change is OnChange.RELOAD and spec.reload_command and pid is not None:
                said = await self.sync.run_reload_command(pid)
                if not said.ok:
                    extra = {"exit_code": said.exit_code, "output_tail": said.output_tail}
                    last = said.output_tail.strip().splitlines()[-1:] or [""]
                    return Failure("reload_failed", f"reload command: {last[0]}".strip(), extra)
            elif self.on_change is OnChange.RELOAD:
                await program.request(SendSignal(signum=spec.reload_signal, reason="config"))
            elif self.on_change is OnChange.RESTART:
                # The state watch follows the new run; the answer says when an
                # overlap replacement failed (the old run is RUNNING again).
                self.restart = program.send(Restart(reason="config"))
                self.restart.add_done_callback(lambda fut: fut.cancelled() or fut.exception())
        except CommandError as exc:
            raise Abandoned(str(exc)) from None
        return None

    async def _running(self, old_pid: int | None) -> bool:
        """Wait for a run (other than ``old_pid``) to be RUNNING; False after the budget."""
        program = self.sync.program
        spec = program.spec
        start = spec.start_seconds
        if spec.ready is not None:
            start = spec.ready.within + spec.ready.timeout
        budget = spec.stop_timeout + start + spec.backoff.max + SETTLE_MARGIN
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(budget):
                while not (program.state is S.RUNNING and program.pid != old_pid):
                    if self._restart_failed() is not None:
                        return False
                    changed = asyncio.ensure_future(self.sync.state_change())
                    waits: set[asyncio.Future[Any]] = {changed}
                    if self.restart is not None and not self.restart.done():
                        waits.add(self.restart)
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    await cancel_and_wait(changed)
                return True
        return False

    def _restart_failed(self) -> Failure | None:
        """An overlap replacement that failed: the version's verdict (the old
        process, which runs the previous version, never stopped serving)."""
        restart = self.restart
        if restart is None or not restart.done() or restart.cancelled():
            return None
        exc = restart.exception()
        if not isinstance(exc, RestartFailed):
            return None
        reason = "not_ready" if exc.reason == "not_ready" else "exited"
        detail = f"the replacement failed ({exc.reason}): {exc.error}"
        return Failure(reason, detail, untouched=True)

    def _probe_failed(self, probe: str, spec: ProbeSpec, error: str, failures: int) -> Failure:
        """``probe_failed`` (DESIGN §5: probe ready, live or confirm), then the
        Failure that rolls the version back."""
        self.sync.history.record(
            "probe_failed",
            self.sync.program.name,
            probe=probe,
            target=spec.describe(),
            error=error,
            failures=failures,
        )
        return Failure(_FAILURE_REASON[probe], error)

    async def _watch(self, make_prober: ProberFactory, confirm: ProbeSpec | None) -> Failure | None:
        """Probation proper: ``confirm`` every interval, then the final checks."""
        program = self.sync.program
        loop = asyncio.get_running_loop()
        until = loop.time() + self.probation
        prober = make_prober(confirm, program.spec) if confirm is not None else None
        ready = make_prober(program.spec.ready, program.spec) if program.spec.ready else None
        try:
            failures = 0
            while (left := until - loop.time()) > 0:
                if prober is None or confirm is None:
                    await asyncio.sleep(left)
                    continue
                error = await prober.run()
                failures = failures + 1 if error else 0
                if error and failures >= confirm.failures:
                    return self._probe_failed("confirm", confirm, error, failures)
                await asyncio.sleep(min(confirm.interval, max(0.0, until - loop.time())))
            if prober and confirm and (error := await final_check(prober, confirm)):
                return self._probe_failed("confirm", confirm, error, FINAL_TRIES)
            ready_spec = program.spec.ready
            if ready and ready_spec and (error := await final_check(ready, ready_spec)):
                return self._probe_failed("ready", ready_spec, error, FINAL_TRIES)
        finally:
            for p in (prober, ready):
                if p is not None:
                    await p.aclose()
        if program.state is S.RUNNING and program.pid != self.pid:
            raise Abandoned("restarted during probation (operator or leak)")
        if program.state is not S.RUNNING or program.pid != self.pid:
            return Failure("exited", f"not running at the end of probation ({program.state.value})")
        return None


_FAILURE_REASON = {"confirm": "unconfirmed", "ready": "not_ready"}


async def final_check(prober: ProbeRunner, spec: ProbeSpec) -> str | None:
    """None once one of FINAL_TRIES attempts passes, else the last error."""
    error: str | None = None
    for attempt in range(FINAL_TRIES):
        if attempt:
            await asyncio.sleep(spec.interval)
        error = await prober.run()
        if error is None:
            return None
    return error
