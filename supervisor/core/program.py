"""One program: its state machine, restart loop and start/stop sequences.

A ``Program`` is an actor. Everything that can change it (an operator's
command, a signal to forward, a leak finding, a config change, the child's
own exit, a timer) arrives as a message in one inbox, and one task handles
the messages in order. Only that task spawns, signals or kills the child, so
"stop during a restart" or "exit during a stop" are just the next message in
the queue, never a race between tasks.

Time is ``ctx.clock`` (monotonic). The only timer is ``_deadline``: what
happens when it passes depends on the state (STARTING: now RUNNING, or not
ready; BACKOFF: start again; STOPPING: SIGKILL).

A program with a ``[ready]`` probe leaves STARTING only on the prober's word
(``Ready``, or ``NotReady`` after ``within``); the deadline is then a
backstop a little after ``within``. A run that gosup stops because it failed
(not ready, or a leak/unhealthy restart that recurs within
``backoff.reset_after``) ends STOPPING -> EXITED and backs off like a crash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from loguru import logger

from supervisor.config import ProgramSpec, RestartPolicy
from supervisor.core import cgroup, gopanic, spawn
from supervisor.core.backoff import BackoffPolicy
from supervisor.core.observations import Observations
from supervisor.core.output import OutputCapture
from supervisor.core.states import SIGNALLABLE_STATES, ProcessState, check_transition
from supervisor.history import History

S = ProcessState
DRAIN_TIMEOUT = 0.5  # how long a crash's last words may take to arrive after the exit
OUTPUT_TAIL_BYTES = 2048  # an exit record's output_tail: the last lines of stderr, at most this
READY_GRACE = 1.0  # the readiness backstop fires this long after within + timeout
# Restarts gosup asks for itself that count as a failed run when they recur
# within backoff.reset_after of the start (a limit below the idle baseline).
FAILING_RESTARTS = frozenset({"leak", "unhealthy"})


class CommandError(Exception):
    """A request that cannot be carried out in the program's current state."""


@dataclass
class Context:
    """What every program shares with its supervisor."""

    history: History
    log_dir: Path
    echo_width: int | None = None
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    # What a child gets in its environment besides gosup's and its own: each
    # provider in this order (the composition root, service/app.py, lists them).
    env_providers: tuple[Callable[[ProgramSpec], Mapping[str, str]], ...] = ()
    # program name -> processes of its past runs that left its group and were
    # found by their marks (service/orphans.py); swept with the group at a stop
    marked_escapees: Callable[[str], list[psutil.Process]] = lambda name: []
    # (spec, extra env) -> (child, binary sha256); tests inject fakes here
    launcher: Callable[[ProgramSpec, dict[str, str]], Awaitable[tuple[spawn.Child, str]]] = (
        spawn.launch
    )

    def extra_env(self, spec: ProgramSpec) -> dict[str, str]:
        """The providers' variables for ``spec``, a later provider winning."""
        env: dict[str, str] = {}
        for provider in self.env_providers:
            env.update(provider(spec))
        return env


# -- messages ---------------------------------------------------------------


@dataclass
class Message:
    reply: asyncio.Future[str] | None = field(default=None, kw_only=True)


@dataclass
class Start(Message):
    reason: str = "operator"


@dataclass
class Stop(Message):
    reason: str = "operator"
    join: bool = False  # a stop already under way is joined instead of refused


@dataclass
class Restart(Message):
    reason: str = "operator"
    # Sent instead of spec.stop_signal for this stop: SIGQUIT makes a Go child
    # write its goroutine dump on the way out (leak evidence), and the exit it
    # causes is still a requested stop, not a crash.
    stop_signal: int | None = None
    # The run this restart was decided for (a leak finding): if that child is
    # gone by the time the message is handled, the restart is moot, and must
    # not revive a program that crashed into FATAL or a `restart = "never"` exit.
    pid: int | None = None


@dataclass
class SendSignal(Message):
    signum: int = signal.SIGHUP
    reason: str = "operator"


@dataclass
class Reconfigure(Message):
    """A reload changed settings that apply to the running process (limits,
    probes, logs, backoff, config_files, stop settings ...): ``spec`` from now
    on, without a restart. (A change of how the child runs, its command or
    environment say, is a restart: the daemon decides which.)"""

    spec: ProgramSpec | None = None


@dataclass
class Kill(Message):
    """SIGKILL the whole tree now (second SIGINT)."""


@dataclass
class Ready(Message):
    """The readiness probe passed for run ``pid``: STARTING -> RUNNING."""

    pid: int


@dataclass
class NotReady(Message):
    """Run ``pid`` did not get ready within ``ready.within``: a failed start."""

    pid: int
    error: str


@dataclass
class _Exited(Message):
    child: spawn.Child
    code: int


class Program:
    def __init__(self, spec: ProgramSpec, ctx: Context) -> None:
        self.spec = spec
        self.name = spec.name
        self.ctx = ctx
        self.state = S.STOPPED
        self.child: spawn.Child | None = None
        self.started_at: float | None = None
        self.start_seq = 0  # order of the latest start among all programs (shutdown reverses it)
        self.failures = 0  # consecutive failed runs
        self.starts = 0
        self.restarts: collections.Counter[str] = collections.Counter()
        self.last_exit: dict[str, Any] | None = None
        self.observations = Observations()  # written by health/ watchers, shown by status
        self.policy = BackoffPolicy(spec.backoff, ctx.rng)
        self.output = OutputCapture(
            spec.name, ctx.log_dir, spec.logs.max_size, spec.logs.backups, ctx.echo_width
        )
        self.state_listeners: list[Callable[[Program, ProcessState, ProcessState], None]] = []
        # Asked, in order, just before the program would go FATAL; one that
        # answers True has changed what the next run starts with (ConfigSync
        # restoring the last confirmed config: docs/config-files.md), and the
        # program gets one more series of attempts instead.
        self.before_fatal: list[Callable[[Program], bool]] = []
        self._inbox: collections.deque[Message] = collections.deque()
        self._wake = asyncio.Event()
        self._deadline: float | None = None
        self._waiters: list[tuple[frozenset[ProcessState], asyncio.Future[str]]] = []
        self._start_after_stop: Start | None = None
        self._stop_reason = ""
        # A stop of a run that failed (not_ready, a recurring leak/unhealthy
        # restart): its reason, and the request to answer once it has stopped.
        self._failed_stop: tuple[str, Message | None] | None = None
        self._stop_deadline = 0.0
        self._oom_kills_at_start = 0
        self._snapshot: list[psutil.Process] = []
        self._killed = False
        self._task: asyncio.Task[None] | None = None
        self._stop_signal: int | None = None  # what the stop under way was begun with
        self._run_end: list[tuple[int, asyncio.Future[int | None]]] = []

    # -- the outside world's side --------------------------------------------

    def launch(self) -> None:
        """Start the program's own task (it idles in STOPPED until told to start)."""
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"program:{self.name}"
        )

    def post(self, msg: Message) -> None:
        self._inbox.append(msg)
        self._wake.set()

    def send(self, msg: Message) -> asyncio.Future[str]:
        """Post a command now; the future holds its outcome (or CommandError)."""
        msg.reply = asyncio.get_running_loop().create_future()
        self.post(msg)
        return msg.reply

    async def request(self, msg: Message) -> str:
        """Post a command and wait for its outcome; CommandError when refused or failed."""
        return await self.send(msg)

    async def close(self) -> None:
        """End the task (the child must already be stopped) and close the log files."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, fut in self._run_end:
            fut.cancel()
        self._run_end = []
        self.output.close()

    def tap_stderr(self, fn: Callable[[bytes], None]) -> Callable[[], None]:
        """Hand ``fn`` what the current run writes to stderr, until the run's
        output is drained or the returned remover is called."""
        return self.output.stderr.tap(fn)

    def exited(self, pid: int) -> asyncio.Future[int | None]:
        """Resolved when the run of ``pid`` is over (the child gone, its output
        drained, STOPPED or EXITED recorded) with the signal gosup began its
        stop with (None: it ended by itself). Done callbacks run before the
        next run starts. Already resolved (None) when ``pid`` is not running."""
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        if pid == self.pid:
            self._run_end.append((pid, fut))
        else:
            fut.set_result(None)
        return fut

    @property
    def stop_reason(self) -> str:
        """Why the stop under way (STOPPING) was begun: "operator", "restart (unhealthy)"..."""
        return self._stop_reason

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def uptime(self) -> float | None:
        if self.started_at is None or self.child is None:
            return None
        return self.ctx.clock() - self.started_at

    def status(self) -> dict[str, Any]:
        uptime = self.uptime()
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "uptime_s": round(uptime, 3) if uptime is not None else None,
            "restarts": sum(self.restarts.values()),
            "failures": self.failures,
            "last_exit": self.last_exit,
            **self.observations.status(self.ctx.clock()),
        }

    # -- the actor -------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            msg = await self._next()
            try:
                if msg is None:
                    await self._on_deadline()
                else:
                    await self._handle(msg)
            except CommandError as exc:
                if msg is not None and msg.reply is not None and not msg.reply.done():
                    msg.reply.set_exception(exc)
            except Exception as exc:  # a bug: log it, keep supervising
                logger.opt(exception=exc).error("{}: internal error handling {}", self.name, msg)
                if msg is not None and msg.reply is not None and not msg.reply.done():
                    msg.reply.set_exception(CommandError(f"internal error: {exc}"))

    async def _next(self) -> Message | None:
        """The next message, or None when the deadline has passed."""
        while not self._inbox:
            self._wake.clear()
            timeout = None
            if self._deadline is not None:
                timeout = self._deadline - self.ctx.clock()
                if timeout <= 0:
                    self._deadline = None
                    return None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
        return self._inbox.popleft()

    async def _handle(self, msg: Message) -> None:
        if isinstance(msg, _Exited):
            await self._on_exit(msg.child, msg.code)
        elif isinstance(msg, Start):
            await self._on_start(msg)
        elif isinstance(msg, Stop):
            self._on_stop(msg)
        elif isinstance(msg, Restart):
            await self._on_restart(msg)
        elif isinstance(msg, SendSignal):
            self._on_signal(msg)
        elif isinstance(msg, Kill):
            self._on_kill(msg)
        elif isinstance(msg, Ready):
            self._on_ready(msg)
        elif isinstance(msg, NotReady):
            self._on_not_ready(msg)
        elif isinstance(msg, Reconfigure):
            self._on_reconfigure(msg)

    def _reply(self, msg: Message, text: str) -> None:
        if msg.reply is not None and not msg.reply.done():
            msg.reply.set_result(text)

    def _wait_for(self, msg: Message, states: frozenset[ProcessState]) -> None:
        """Reply to ``msg`` when the program next enters one of ``states``."""
        if msg.reply is not None:
            self._waiters.append((states, msg.reply))

    # -- transitions -------------------------------------------------------------

    def _record(self, event: str, **fields: Any) -> None:
        self.ctx.history.record(event, self.name, **fields)

    def _transition(self, new: ProcessState, event: str | None = None, **fields: Any) -> None:
        """The one place the state changes: check the edge, write the record, then act."""
        old = self.state
        check_transition(old, new)
        if event is not None:
            self._record(event, **fields)
        self.state = new
        logger.debug("{}: {} -> {}", self.name, old.value, new.value)
        for listener in self.state_listeners:
            try:
                listener(self, old, new)
            except Exception as exc:  # an observer's bug must not stall the state machine
                logger.opt(exception=exc).error("{}: state listener failed", self.name)
        waiters, self._waiters = self._waiters, []
        for states, fut in waiters:
            if fut.done():
                continue
            if new in states:
                fut.set_result(self._describe())
            elif new in (S.EXITED, S.FATAL, S.STOPPED, S.BACKOFF):
                fut.set_exception(CommandError(f"{self.name}: {self._describe()}"))
            else:
                self._waiters.append((states, fut))

    def _describe(self) -> str:
        if self.state is S.RUNNING:
            return f"{self.name} running (pid {self.pid})"
        if self.state is S.EXITED and self.last_exit:
            return f"{self.name} exited: {_exit_summary(self.last_exit)}"
        return f"{self.name} {self.state.value.lower()}"

    # -- starting ----------------------------------------------------------------

    async def _on_start(self, msg: Start) -> None:
        if self.state in (S.STARTING, S.RUNNING):
            self._reply(msg, f"{self.name} already running (pid {self.pid})")
            return
        if self.state is S.STOPPING:
            raise CommandError(f"{self.name} is stopping; start it once it has stopped")
        if msg.reason == "operator":
            self.failures = 0  # an operator's start begins a fresh series (and leaves FATAL)
        self._deadline = None
        self._wait_for(msg, frozenset({S.RUNNING}))
        await self._spawn()

    async def _spawn(self) -> None:
        self._transition(S.STARTING)
        spec = self.spec
        try:
            child, digest = await self.ctx.launcher(spec, self.ctx.extra_env(spec))
        except (spawn.SpawnError, OSError) as exc:
            logger.error("{}: cannot start: {}", self.name, exc)
            self.last_exit = {"pid": None, "exit_code": None, "signal": None, "error": str(exc)}
            self._transition(
                S.EXITED,
                "exited",
                pid=None,
                exit_code=None,
                signal=None,
                uptime_s=0.0,
                error=str(exc),
            )
            self._after_failed_run(healthy=False)
            return
        self.child = child
        self.start_seq = _next_start_seq()
        self.started_at = self.ctx.clock()
        self.starts += 1
        self._killed = False
        self._oom_kills_at_start = cgroup.oom_kills()
        self._record("started", pid=child.pid, attempt=self.failures + 1, binary_sha256=digest)
        await self.output.attach(child.stdout, child.stderr)
        child.exited.add_done_callback(lambda fut: self.post(_Exited(child, fut.result())))
        logger.info("{}: started pid {}", self.name, child.pid)
        if spec.ready is None:
            self._deadline = self.ctx.clock() + spec.start_seconds
        else:  # the prober decides; this is only its backstop
            ready = spec.ready
            self._deadline = self.ctx.clock() + ready.within + ready.timeout + READY_GRACE

    async def _on_deadline(self) -> None:
        if self.state is S.STARTING and self.spec.ready is not None:
            within = self.spec.ready.within
            self._not_ready(f"no verdict from the readiness probe within {within:g}s")
        elif self.state is S.STARTING:  # STARTING -> RUNNING: stayed up start_seconds
            self._transition(S.RUNNING, "running", pid=self.pid)
        elif self.state is S.BACKOFF:  # BACKOFF -> STARTING: the delay is over
            await self._spawn()
        elif self.state is S.STOPPING:  # STOPPING: stop_timeout passed, no more asking
            self._kill_tree()

    def _on_ready(self, msg: Ready) -> None:
        if self.state is S.STARTING and msg.pid == self.pid:  # STARTING -> RUNNING: ready
            self._deadline = None
            self._transition(S.RUNNING, "running", pid=self.pid)
        self._reply(msg, self._describe())

    def _on_not_ready(self, msg: NotReady) -> None:
        if self.state is S.STARTING and msg.pid == self.pid:
            self._not_ready(msg.error)
        self._reply(msg, self._describe())

    def _not_ready(self, error: str) -> None:
        """A failed start: stop the child, then EXITED (reason not_ready) and back off."""
        logger.warning("{}: not ready: {}", self.name, error)
        self._failed_stop = ("not_ready", None)
        self._begin_stop("not_ready")

    # -- exits -------------------------------------------------------------------

    async def _on_exit(self, child: spawn.Child, code: int) -> None:
        if child is not self.child:
            return  # a previous run, already accounted for
        uptime = self.ctx.clock() - (self.started_at or self.ctx.clock())
        await self.output.drain(DRAIN_TIMEOUT)
        leftovers = self._leftovers(child)
        info = self._exit_info(child, code, uptime)
        self.last_exit = info
        self.child = None
        self._deadline = None
        if self.state is S.STOPPING:
            if self.policy.run_was_healthy(uptime):
                self.failures = 0  # a long run ended on request still ends a failure series
            await self._finish_stop(child, info, leftovers)
            return
        healthy = self.state is S.RUNNING and self.policy.run_was_healthy(uptime)
        was_running = self.state is S.RUNNING
        self._transition(S.EXITED, "exited", **info)
        # A crashed program's helpers must not outlive it, even those that left its group.
        spawn.kill_tree(leftovers + self.ctx.marked_escapees(self.name))
        logger.warning("{}: exited: {}", self.name, _exit_summary(info))
        if self._should_restart(code):
            self._after_failed_run(healthy=healthy and was_running)
        await self._run_ended(child, None)

    def _leftovers(self, child: spawn.Child) -> list[psutil.Process]:
        """What is left of the child's tree: its group, plus the snapshot taken at stop."""
        return self._snapshot + child.group_members()

    def _exit_info(self, child: spawn.Child, code: int, uptime: float) -> dict[str, Any]:
        sig = -code if code < 0 else None
        info: dict[str, Any] = {
            "pid": child.pid,
            "exit_code": code if code >= 0 else None,
            "signal": spawn.signal_by_name(sig) if sig else None,
            "uptime_s": round(uptime, 3),
        }
        crash = None
        if code != 0 and self.state is not S.STOPPING:
            crash = gopanic.parse(self.output.stderr.tail_text())
            oom = cgroup.oom_kills() > self._oom_kills_at_start
            if crash is None and sig == signal.SIGKILL and not self._killed and oom:
                crash = gopanic.oom_crash()
        if crash is not None:
            info["crash"] = crash.to_dict()
        elif self._failed_run(code) and (tail := output_tail(self.output.stderr.tail_text())):
            info["output_tail"] = tail  # a failed run's reason is most likely in its last words
        return info

    def _failed_run(self, code: int) -> bool:
        if self._failed_stop_reason() == "not_ready":
            return True
        return self.state is not S.STOPPING and code not in self.spec.success_exit_codes

    def _should_restart(self, code: int) -> bool:
        policy = self.spec.restart
        if policy is RestartPolicy.ALWAYS:
            return True
        if policy is RestartPolicy.NEVER:
            return False
        return code not in self.spec.success_exit_codes

    def _after_failed_run(self, *, healthy: bool, reason: str | None = "crash") -> None:
        """EXITED -> STARTING / BACKOFF / FATAL, by the backoff policy.

        ``reason`` is what the restart counts as (None: counted already, when
        it was requested); a reason other than a crash is named in ``fatal``."""
        if healthy:
            self.failures = 0
            self.restarts[reason or "crash"] += 1
            self._deadline = self.ctx.clock()  # EXITED -> BACKOFF, delay 0 (starts at once)
            self._transition(S.BACKOFF, "backoff", attempt=1, delay_s=0.0)
            return
        self.failures += 1
        decision = self.policy.decide(self.failures)
        if decision.give_up and self._last_chance():
            self.failures = 0  # a fresh series, at once, with what was restored
            decision = self.policy.decide(self.failures)
        if decision.give_up:
            why = {} if reason == "crash" else {"reason": self._stop_reason_name(reason)}
            self._transition(S.FATAL, "fatal", attempts=self.failures, **why)
            logger.error("{}: gave up after {} failed runs", self.name, self.failures)
            return
        if reason is not None:
            self.restarts[reason] += 1
        self._deadline = self.ctx.clock() + decision.delay
        self._transition(
            S.BACKOFF, "backoff", attempt=self.failures, delay_s=round(decision.delay, 3)
        )

    def _last_chance(self) -> bool:
        """Whether a before_fatal hook changed something worth another series."""
        changed = False
        for hook in self.before_fatal:
            try:
                changed = hook(self) or changed
            except Exception as exc:  # a hook's bug must not keep the program out of FATAL
                logger.opt(exception=exc).error("{}: before_fatal hook failed", self.name)
        return changed

    # -- stopping ----------------------------------------------------------------

    def _on_stop(self, msg: Stop) -> None:
        if self.state is S.STOPPING and self._failed_stop is not None:
            self._cancel_failed_stop(msg.reason)  # ends STOPPED, no backoff
            self._wait_for(msg, frozenset({S.STOPPED}))
            return
        if self.state is S.STOPPING:
            if not msg.join:
                raise CommandError(f"{self.name} is already stopping")
            pending, self._start_after_stop = self._start_after_stop, None
            if pending is not None and pending.reply is not None and not pending.reply.done():
                # The restart under way will not start again: say so, or its caller waits forever.
                pending.reply.set_exception(
                    CommandError(f"{self.name}: restart cancelled ({msg.reason})")
                )
            self._wait_for(msg, frozenset({S.STOPPED}))
            return
        if self.state is S.STOPPED:
            self._reply(msg, f"{self.name} already stopped")
            return
        if self.state in (S.BACKOFF, S.EXITED, S.FATAL):  # nothing runs: just settle
            self._deadline = None
            self._transition(S.STOPPED)
            self._reply(msg, f"{self.name} stopped")
            return
        self._wait_for(msg, frozenset({S.STOPPED}))
        self._begin_stop(msg.reason)

    def _begin_stop(self, reason: str, sig: int | None = None) -> None:
        child = self.child
        assert child is not None
        self._stop_reason = reason
        self._transition(S.STOPPING, "stopping", pid=child.pid, reason=reason)
        self._snapshot = child.tree()
        sig = sig or self.spec.stop_signal
        self._stop_signal = sig
        child.signal_group(sig)
        child.signal_escaped(self._snapshot, sig)  # descendants that left the group too
        self._stop_deadline = self._deadline = self.ctx.clock() + self.spec.stop_timeout

    def _kill_tree(self) -> None:
        if self.child is not None:
            self._killed = True
            self.child.signal_group(signal.SIGKILL)
            spawn.kill_tree(self._snapshot + self.child.tree())

    def _kill_pending(self) -> bool:
        return any(isinstance(m, Kill) for m in self._inbox)

    def _on_kill(self, msg: Kill) -> None:
        if self.state in (S.STARTING, S.RUNNING):
            self._begin_stop("killed")
        if self.state is S.STOPPING:
            self._kill_tree()
        self._reply(msg, f"{self.name} killed")

    async def _finish_stop(
        self, child: spawn.Child, info: dict[str, Any], leftovers: list[psutil.Process]
    ) -> None:
        """The main process is gone: give the rest of the tree what is left of
        stop_timeout, then SIGKILL whatever still runs, so no descendant survives."""
        survivors = spawn.alive(leftovers)
        if survivors and not self._killed:
            budget = self._stop_deadline - self.ctx.clock()
            # A Kill (shutdown_timeout, second SIGINT) queues behind this wait: it
            # must cut it short, not wait out the rest of stop_timeout.
            survivors = await spawn.wait_gone(
                survivors, budget, self.ctx.clock, cut_short=self._kill_pending
            )
        if survivors:
            self._killed = True
            spawn.kill_tree(survivors)
            await spawn.wait_gone(survivors, 2.0, self.ctx.clock)
        self._snapshot = []
        if self._failed_stop is not None:
            await self._end_failed_run(child, info)
            return
        self._record("exited", **info)
        self._transition(
            S.STOPPED, "stopped", pid=child.pid, reason=self._stop_reason, killed=self._killed
        )
        logger.info("{}: stopped ({})", self.name, self._stop_reason)
        await self._run_ended(child, self._stop_signal)
        pending, self._start_after_stop = self._start_after_stop, None
        if pending is not None:
            self._wait_for(pending, frozenset({S.RUNNING}))
            await self._spawn()

    async def _end_failed_run(self, child: spawn.Child, info: dict[str, Any]) -> None:
        """STOPPING -> EXITED: gosup stopped a run that failed; back off like a crash."""
        assert self._failed_stop is not None
        reason, request = self._failed_stop
        self._failed_stop = None
        self._start_after_stop = None
        info["reason"] = reason
        self.last_exit = info
        self._transition(S.EXITED, "exited", **info)
        await self._run_ended(child, self._stop_signal)  # its evidence comes before the backoff
        logger.warning("{}: failed run ({}): backing off", self.name, reason)
        # not_ready counts as a restart of its own; a leak/unhealthy one was counted when asked
        self._after_failed_run(healthy=False, reason=reason if reason == "not_ready" else None)
        if request is not None:
            self._reply(request, f"{self._describe()} (a failed run: {reason})")

    def _stop_reason_name(self, reason: str | None) -> str:
        return reason or (self.last_exit or {}).get("reason") or "crash"

    def _failed_stop_reason(self) -> str | None:
        return self._failed_stop[0] if self._failed_stop is not None else None

    def _cancel_failed_stop(self, why: str) -> None:
        """An operator's (or the shutdown's) stop wins over a failed run's backoff."""
        if self._failed_stop is not None:
            _, request = self._failed_stop
            self._failed_stop = None
            if request is not None and request.reply is not None and not request.reply.done():
                request.reply.set_exception(CommandError(f"{self.name}: restart cancelled ({why})"))

    async def _run_ended(self, child: spawn.Child, stop_signal: int | None) -> None:
        """Resolve the `exited` futures of this run, and let their callbacks run
        before anything else happens here (such as the next start)."""
        ended = [fut for pid, fut in self._run_end if pid == child.pid]
        self._run_end = [(pid, fut) for pid, fut in self._run_end if pid != child.pid]
        for fut in ended:
            if not fut.done():
                fut.set_result(stop_signal)
        if ended:
            await asyncio.sleep(0)  # callbacks were queued first: they run now

    # -- restart and signals ------------------------------------------------------

    async def _on_restart(self, msg: Restart) -> None:
        if self.state is S.STOPPING:
            raise CommandError(f"{self.name} is stopping; start it once it has stopped")
        if msg.pid is not None and msg.pid != self.pid:
            raise CommandError(f"{self.name}: pid {msg.pid} is gone already; nothing to restart")
        self._record("restart_requested", reason=msg.reason)
        self.restarts[msg.reason] += 1
        uptime = self.uptime()
        recurring = uptime is not None and not self.policy.run_was_healthy(uptime)
        if self.state in (S.STARTING, S.RUNNING) and msg.reason in FAILING_RESTARTS and recurring:
            # Back within reset_after of the start: the limit (or the probe) fails
            # this program at its baseline; back off towards FATAL, never loop.
            self._failed_stop = (msg.reason, msg)
            self._begin_stop(f"restart ({msg.reason})", msg.stop_signal)
            return
        if self.state in (S.STARTING, S.RUNNING):
            self._start_after_stop = Start(reason=msg.reason, reply=msg.reply)
            self._begin_stop(f"restart ({msg.reason})", msg.stop_signal)
            return
        if msg.reason in ("operator", "build"):  # a person acted: a fresh series
            self.failures = 0
        self._deadline = None
        self._wait_for(msg, frozenset({S.RUNNING}))
        if self.state is not S.STOPPED:
            self._transition(S.STOPPED)
        await self._spawn()

    def _on_reconfigure(self, msg: Reconfigure) -> None:
        spec = msg.spec
        if spec is None or spec.name != self.name:
            raise CommandError(f"{self.name}: no spec for this program to use")
        self.spec = spec  # the failure count and the current run carry on
        self.policy = BackoffPolicy(spec.backoff, self.ctx.rng)
        self.output.set_rotation(spec.logs.max_size, spec.logs.backups)
        self._reply(msg, f"{self.name} updated in place")

    def _on_signal(self, msg: SendSignal) -> None:
        child = self.child
        if child is None or self.state not in SIGNALLABLE_STATES:
            raise CommandError(f"{self.name} is not running ({self.state.value})")
        name = signal.Signals(msg.signum).name
        self._record("signal_sent", signal=name, reason=msg.reason)
        if not child.send_signal(msg.signum):
            raise CommandError(f"{self.name} is not running")
        self._reply(msg, f"{name} sent to {self.name} (pid {child.pid})")


_start_counter = 0


def _next_start_seq() -> int:
    global _start_counter
    _start_counter += 1
    return _start_counter


def _exit_summary(info: dict[str, Any]) -> str:
    if info.get("error"):
        return str(info["error"])
    how = f"signal {info['signal']}" if info.get("signal") else f"exit code {info.get('exit_code')}"
    if info.get("reason"):
        how = f"{info['reason']} ({how})"
    crash = info.get("crash")
    if crash:
        how += f" ({crash['kind']}: {crash['message']})"
    elif info.get("output_tail"):
        how += f": {info['output_tail'].splitlines()[-1]}"
    return how


def output_tail(text: str, limit: int = OUTPUT_TAIL_BYTES) -> str:
    """The last whole lines of ``text`` within ``limit`` bytes (UTF-8), trailing blanks cut."""
    data = text.rstrip().encode()
    if len(data) > limit:
        data = data[-limit:]
        cut = data.find(b"\n")
        data = data[cut + 1 :] if 0 <= cut < len(data) - 1 else data
    return data.decode("utf-8", "ignore")
