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

Whatever fails inside the actor (a history write on a full disk, a log
write, a listener, a bug), the program ends in a state it can leave: a
record that cannot be written is logged (once per burst) and the transition
happens all the same; a child's exit is watched before anything else is
done with it; and after an unexpected error ``_settle`` brings the program
back to a consistent state (a dead child's exit handled, no STARTING or
RUNNING without a child), so ``restart``, ``stop`` and the shutdown are
always answered.

Nothing that can stall runs on the loop (DESIGN §1): the process-tree
walks of a stop (psutil reads every process's parent: all of /proc) run in
a thread while the actor waits, so the order is kept (``stopping`` is
written, the tree taken, then the signal sent) and the loop goes on. Work
that others must do between a run's end and the next start, off the loop
too (a rollback restoring the file the next run reads, the dump of the run
that ended), is handed in with ``hold_next_start``: the next start waits for
it, ``HOLD_TIMEOUT`` at most.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from loguru import logger

from supervisor.config import ProgramSpec, RestartMode, RestartPolicy
from supervisor.core import cgroup, gopanic, spawn
from supervisor.core.backoff import BackoffPolicy
from supervisor.core.observations import Observations
from supervisor.core.output import OutputCapture
from supervisor.core.overlap import OldRun, Retiring
from supervisor.core.states import SIGNALLABLE_STATES, ProcessState, check_transition
from supervisor.history import History

if TYPE_CHECKING:  # only named in annotations here
    import psutil

S = ProcessState
DRAIN_TIMEOUT = 0.5  # how long a crash's last words may take to arrive after the exit
OUTPUT_TAIL_BYTES = 2048  # an exit record's output_tail: the last lines of stderr, at most this
READY_GRACE = 1.0  # the readiness backstop fires this long after within + timeout
# The longest a start waits for work handed in with hold_next_start (a slow
# disk): past it the program starts all the same and the work finishes by itself.
HOLD_TIMEOUT = 10.0
# A crash loop's log: the first LOUD_FAILURES failed runs in a row are logged
# in full (started, exited); after them, one exit line every FOLD_EVERY seconds
# says how many were not logged (the history has every run). 200 programs
# crash-looping wrote 400 lines a second, past journald's default rate limit
# (10,000 lines in 30 s), after which it drops gosup's other lines too.
LOUD_FAILURES = 5
FOLD_EVERY = 30.0
# Restarts gosup asks for itself that count as a failed run when they recur
# within backoff.reset_after of the start (a limit below the idle baseline).
FAILING_RESTARTS = frozenset({"leak", "unhealthy"})


class CommandError(Exception):
    """A request that cannot be carried out in the program's current state."""


class RestartFailed(CommandError):
    """An overlap restart whose replacement failed; the old process serves on."""

    def __init__(self, message: str, reason: str, error: str) -> None:
        super().__init__(message)
        self.reason = reason  # as in restart_failed: exited, not_ready, spawn_failed
        self.error = error


class Launcher(Protocol):
    """Starts a program's child: (child, binary sha256); ``spawn.launch``."""

    def __call__(
        self, spec: ProgramSpec, extra_env: dict[str, str], *, at_once: bool = False
    ) -> Awaitable[tuple[spawn.Child, str]]: ...


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
    # whether the orphans of gosup's children come to it (the subreaper, PID 1):
    # then a crash whose group is empty and that left no orphan needs no sweep
    adopts: Callable[[], bool] = lambda: False
    # (spec, extra env, at_once=) -> (child, binary sha256); tests inject fakes here
    launcher: Launcher = spawn.launch

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


@dataclass
class _RetireTimeout(Message):
    """stop_timeout passed for a process stopped beside the current run."""

    child: spawn.Child


@dataclass
class _Launch:
    """A start's outcome: the child and its binary's hash, or what went wrong."""

    started_from: int  # spawn.start_ticks() just before: what started since is not a leftover
    child: spawn.Child | None = None
    digest: str = ""
    error: Exception | None = None

    def discard(self) -> None:
        """A child started ahead of its records that will not be run after all
        (a bug in the bookkeeping): kill it, close its pipes; its exit is ignored."""
        if self.child is not None:
            self.child.signal_group(signal.SIGKILL)
            for pipe in (self.child.stdout, self.child.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()


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
        # An overlap restart (core/overlap.py): the run being replaced while
        # its replacement starts, and processes being stopped beside the current run.
        self._old: OldRun | None = None
        self._retiring: list[Retiring] = []
        self._records_lost = 0  # history records that could not be written, this burst
        self._holds: set[asyncio.Task[Any]] = set()  # work the next start waits for
        # A crashed run whose leftovers are still to be swept (with the snapshot
        # taken at its stop), and the sweeps running beside a new run.
        self._crashed: tuple[spawn.Child, list[psutil.Process]] | None = None
        self._exit_log: dict[str, Any] | None = None  # an exit logged after its restart began
        self._folded = 0  # a long failure series' exits not logged since the last line
        self._folded_at = 0.0  # (ctx.clock) when its last exit line was logged
        self._sweeps: set[asyncio.Future[None]] = set()

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
        await self._holds_done()  # a dump of the last run, say
        if self._sweeps:  # a sweep beside the last run: let it finish (it logs its errors)
            await asyncio.wait(self._sweeps)
        self.output.close()

    def hold_next_start(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` now, and make the program's next start wait for it.

        For what a state listener or an ``exited`` callback must finish
        before the next run starts but may not do on the loop (DESIGN §1):
        ConfigSync restoring the file the next run reads, the SIGQUIT dump of
        the run that ended. The wait is HOLD_TIMEOUT at most; ``work``
        handles its own errors (one that escapes is logged)."""
        task = asyncio.get_running_loop().create_task(work, name=f"hold:{self.name}")
        self._holds.add(task)
        task.add_done_callback(self._hold_done)

    def _hold_done(self, task: asyncio.Task[Any]) -> None:
        self._holds.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.opt(exception=exc).error("{}: {} failed", self.name, task.get_name())

    async def _holds_done(self) -> None:
        """Wait (HOLD_TIMEOUT at most) for the work handed in with hold_next_start."""
        if not self._holds:
            return
        _, pending = await asyncio.wait(set(self._holds), timeout=HOLD_TIMEOUT)
        if pending:
            logger.warning(
                "{}: going on while {} task(s) before the start still run (a slow disk?)",
                self.name,
                len(pending),
            )

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
        overlap = {}
        if self._old is not None:  # the old process serves; its replacement starts
            overlap = {"pid": self._old.child.pid, "replacement_pid": self.pid}
        return {
            "name": self.name,
            "state": self.state.value,
            "pid": self.pid,
            "replacement_pid": None,
            **overlap,
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
                self._settle()

    def _settle(self) -> None:
        """After an unexpected error: make sure the program can leave its state.

        A child that is gone has its exit handled (again: a duplicate is
        ignored); a state that needs a child but has none ends that run."""
        try:
            child = self.child
            if child is not None and not child.alive():
                self._watch_exit(child)
            elif child is None and self.state is S.STOPPING:  # STOPPING -> STOPPED: gone
                self._deadline = None
                self._transition(S.STOPPED)
            elif child is None and self.state in (S.STARTING, S.RUNNING):
                self._transition(S.EXITED)  # -> EXITED: the run is over, back off
                self._after_failed_run(healthy=False)
        except Exception as exc:
            logger.opt(exception=exc).error("{}: cannot settle after an error", self.name)

    async def _next(self) -> Message | None:
        """The next message, or None when the deadline has passed.

        The deadline is a timer that sets ``_wake`` (not ``asyncio.timeout``,
        which cancels the wait and turns the CancelledError into a
        TimeoutError: a crash loop passes a deadline at every run)."""
        while not self._inbox:
            self._wake.clear()
            timer = None
            if self._deadline is not None:
                timeout = self._deadline - self.ctx.clock()
                if timeout <= 0:
                    self._deadline = None
                    return None
                timer = asyncio.get_running_loop().call_later(timeout, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
        self._log_exit(None)
        await self._sweep_crashed(None)  # a message before the restart: sweep first
        return self._inbox.popleft()

    async def _handle(self, msg: Message) -> None:
        if isinstance(msg, _Exited):
            await self._on_exit(msg.child, msg.code)
        elif isinstance(msg, Start):
            await self._on_start(msg)
        elif isinstance(msg, Stop):
            await self._on_stop(msg)
        elif isinstance(msg, Restart):
            await self._on_restart(msg)
        elif isinstance(msg, SendSignal):
            self._on_signal(msg)
        elif isinstance(msg, Kill):
            await self._on_kill(msg)
        elif isinstance(msg, Ready):
            await self._on_ready(msg)
        elif isinstance(msg, NotReady):
            await self._on_not_ready(msg)
        elif isinstance(msg, _RetireTimeout):
            await self._on_retire_timeout(msg)
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
        """Write a history record; one that cannot be written (a full disk) is
        logged, once per burst, and supervision goes on."""
        try:
            self.ctx.history.record(event, self.name, **fields)
        except Exception as exc:
            if not self._records_lost:
                logger.error("{}: cannot write the history ({}): records are lost", self.name, exc)
            self._records_lost += 1
            return
        if self._records_lost:
            logger.warning(
                "{}: history written again ({} records lost)", self.name, self._records_lost
            )
            self._records_lost = 0

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

    async def _spawn(self, launched: _Launch | None = None) -> None:
        """-> STARTING, and the child started; ``launched``: started already
        (a crash restarted at once, ``_on_exit``), its records come now."""
        if launched is None:
            await self._holds_done()
            self._transition(S.STARTING)
            launched = await self._launch(at_once=False)
        else:
            self._transition(S.STARTING)
        spec = self.spec
        started_from = launched.started_from
        child, digest, exc = launched.child, launched.digest, launched.error
        if child is None:  # SpawnError, OSError (EMFILE ...), ValueError from Popen
            assert exc is not None
            self._log_exit(None)
            await self._sweep_crashed(None)
            logger.error("{}: cannot start: {}", self.name, exc)
            if self._old is not None:
                await self._overlap_failed("spawn_failed", str(exc), None)
                return
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
        self.child = child  # its exit is watched already (_launch)
        self._log_exit(None)
        await self._sweep_crashed(started_from)  # not awaited: it runs beside the new run
        self.start_seq = _next_start_seq()
        self.started_at = self.ctx.clock()
        self.starts += 1
        self._killed = False
        before = child.oom_kills_before  # read by the spawn thread, just before the fork
        self._oom_kills_at_start = cgroup.oom_kills() if before is None else before
        self._record("started", pid=child.pid, attempt=self.failures + 1, binary_sha256=digest)
        try:
            await self.output.attach(child.stdout, child.stderr)
        except Exception as exc:  # out of fds, say: the run goes on, unlogged
            logger.opt(exception=exc).error("{}: cannot capture the output", self.name)
            for pipe in (child.stdout, child.stderr):
                with contextlib.suppress(OSError):
                    pipe.close()
        if self.failures < LOUD_FAILURES:
            logger.info("{}: started pid {}", self.name, child.pid)
        else:  # a long failure series: its exit lines say how it goes (_log_exit)
            logger.debug("{}: started pid {}", self.name, child.pid)
        if spec.ready is None:
            self._deadline = self.ctx.clock() + spec.start_seconds
        else:  # the prober decides; this is only its backstop
            ready = spec.ready
            self._deadline = self.ctx.clock() + ready.within + ready.timeout + READY_GRACE

    async def _launch(self, *, at_once: bool) -> _Launch:
        """Start the child; a failure is returned, not raised. Its exit is
        watched before anything else can fail: never STARTING with a dead pid.
        ``at_once``: fork on the loop's thread (a restart at once), else in
        the spawn thread (``spawn.launch``)."""
        started_from = spawn.start_ticks()  # what starts from now on is not a leftover
        try:
            env = self.ctx.extra_env(self.spec)
            child, digest = await self.ctx.launcher(self.spec, env, at_once=at_once)
        except Exception as exc:
            return _Launch(started_from, error=exc)
        self._watch_exit(child)
        return _Launch(started_from, child, digest)

    def _restarts_at_once(self, child: spawn.Child, code: int, uptime: float) -> bool:
        """Whether this exit is a crash after a healthy run that nothing else has
        a say in: then the replacement starts before the exit's bookkeeping.

        Not when anyone waits for the run's end (``exited``: a dump), holds the
        next start, or may (ConfigSync rolls a file back before the next start
        reads it): those take the ordinary path, records first."""
        return (
            self.state is S.RUNNING
            and self._old is None
            and not self._holds
            and not self.spec.config_files
            and not any(pid == child.pid for pid, _ in self._run_end)
            and self._should_restart(code)
            and self.policy.run_was_healthy(uptime)
        )

    async def _on_deadline(self) -> None:
        if self.state is S.STARTING and self.spec.ready is not None:
            within = self.spec.ready.within
            await self._not_ready(f"no verdict from the readiness probe within {within:g}s")
        elif self.state is S.STARTING and self._child_alive():  # STARTING -> RUNNING: stayed up
            await self._became_running()
        elif self.state is S.BACKOFF:  # BACKOFF -> STARTING: the delay is over
            await self._spawn()
        elif self.state is S.STOPPING:  # STOPPING: stop_timeout passed, no more asking
            await self._kill_tree()

    async def _on_ready(self, msg: Ready) -> None:
        if self.state is S.STARTING and msg.pid == self.pid and self._child_alive():  # -> RUNNING
            self._deadline = None
            await self._became_running()
        self._reply(msg, self._describe())

    def _child_alive(self) -> bool:
        """Whether the child runs: its exit may have happened (gosup stopped by
        SIGSTOP, say) before the loop heard of it; then its exit is next."""
        return self.child is not None and self.child.alive()

    def _watch_exit(self, child: spawn.Child) -> None:
        """Post the child's exit to the inbox once it happens (a duplicate is ignored),
        from the exit's own callback: the actor wakes on the next loop turn."""
        child.on_exit(lambda code: self.post(_Exited(child, code)))

    async def _on_not_ready(self, msg: NotReady) -> None:
        if self.state is S.STARTING and msg.pid == self.pid:
            await self._not_ready(msg.error)
        self._reply(msg, self._describe())

    async def _became_running(self) -> None:
        """STARTING -> RUNNING; an overlap's replacement now takes over from the old run."""
        self._transition(S.RUNNING, "running", pid=self.pid)
        if self._old is not None:
            await self._take_over()

    async def _not_ready(self, error: str) -> None:
        """A failed start: stop the child, then EXITED (reason not_ready) and back off."""
        logger.warning("{}: not ready: {}", self.name, error)
        if self._old is not None:
            await self._overlap_failed("not_ready", error, self.child)
            return
        self._failed_stop = ("not_ready", None)
        await self._begin_stop("not_ready")

    # -- exits -------------------------------------------------------------------

    async def _on_exit(self, child: spawn.Child, code: int) -> None:
        if await self._beside_exited(child, code):
            return  # a process stopped (or replaced) beside the current run
        if child is not self.child:
            return  # a previous run, already accounted for
        if self._old is not None and self.state is S.STARTING:
            await self._replacement_crashed(child, code)
            return
        # The run's end, not when gosup heard of it (gosup may have been stopped).
        ended = self.ctx.clock() - child.ended_ago()
        uptime = max(ended - (self.started_at or ended), 0.0)
        # A healthy run that crashed is back at once, and first: what DESIGN §5
        # records about the exit (exited, backoff, then started: the same
        # records, in the same order) is written just after the Popen, with the
        # crash reading, the state listeners and the log lines.
        at_once = self._restarts_at_once(child, code, uptime)
        launched = await self._launch(at_once=True) if at_once else None
        try:
            await self._account_exit(child, code, uptime)
        except BaseException:
            if launched is not None:
                launched.discard()
            raise
        if launched is not None:
            if self.state is S.BACKOFF:
                await self._spawn(launched)
            else:  # pragma: no cover - _restarts_at_once decided it would be
                launched.discard()

    async def _account_exit(self, child: spawn.Child, code: int, uptime: float) -> None:
        """The run is over: drain its output, read how it ended, record it, and
        decide (restart at once, back off, give up, or stay EXITED/STOPPED)."""
        try:
            await self.output.drain(DRAIN_TIMEOUT)
        except Exception as exc:  # the exit is handled all the same
            logger.opt(exception=exc).error("{}: draining the output failed", self.name)
        healthy = self.state is S.RUNNING and self.policy.run_was_healthy(uptime)
        # A healthy run that crashed is back at once: what it left is looked for
        # (a scan of the process table) just after the replacement has started.
        # Otherwise a crash's leftovers are listed and killed in one thread hop
        # (``_sweep_crashed``) once ``exited`` is written; a stop lists them now.
        at_once = healthy and self._should_restart(code)
        stopping = self.state is S.STOPPING
        leftovers = await self._list_leftovers(child) if stopping else []
        try:
            info = self._exit_info(child, code, uptime)
        except Exception as exc:
            logger.opt(exception=exc).error("{}: cannot read the exit", self.name)
            info = {"pid": child.pid, "exit_code": code if code >= 0 else None, "signal": None}
        self.last_exit = info
        self.child = None
        self._deadline = None
        if stopping:
            if self.policy.run_was_healthy(uptime):
                self.failures = 0  # a long run ended on request still ends a failure series
            await self._finish_stop(child, info, leftovers)
            return
        self._transition(S.EXITED, "exited", **info)
        # A crashed program's helpers must not outlive it, even those that left its
        # group; finding them scans the process table: off the loop.
        self._crashed = (child, list(self._snapshot))
        if not at_once:
            await self._sweep_crashed(None)
        restart = self._should_restart(code)
        failed = restart and not healthy  # a failure series goes on
        self._log_exit(info, later=at_once, series=self.failures + 1 if failed else 0)
        if restart:
            self._after_failed_run(healthy=healthy)
        await self._run_ended(child, None)

    async def _list_leftovers(self, child: spawn.Child) -> list[psutil.Process]:
        try:  # a scan of the process table: off the loop
            return await asyncio.to_thread(self._leftovers, child, self._snapshot)
        except Exception as exc:
            logger.opt(exception=exc).error("{}: cannot list what is left of the run", self.name)
            return list(self._snapshot)

    def _log_exit(self, info: dict[str, Any] | None, later: bool = False, series: int = 0) -> None:
        """Log an exit; ``later``: once the restart at once has begun (a log line
        is a fraction of a millisecond the replacement need not wait for).

        ``series``: the exit is the n-th failed run in a row (0: not a failed
        run). Past LOUD_FAILURES, one exit line every FOLD_EVERY seconds."""
        if later:
            self._exit_log = info
            return
        info, self._exit_log = info or self._exit_log, None
        if info is None:
            return
        summary = _exit_summary(info)
        if series < LOUD_FAILURES:
            self._folded = 0
        elif series == LOUD_FAILURES:
            self._folded, self._folded_at = 0, self.ctx.clock()
            summary += (
                f" ({series} failed runs in a row: from now on one exit line every"
                f" {FOLD_EVERY:g}s; `gosup history {self.name}` has every run)"
            )
        elif self.ctx.clock() - self._folded_at < FOLD_EVERY:
            self._folded += 1
            logger.debug("{}: exited: {}", self.name, summary)
            return
        else:
            summary += (
                f" (failed run {series} in a row; {self._folded} more exits since the"
                f" last line, each in the history)"
            )
            self._folded, self._folded_at = 0, self.ctx.clock()
        logger.warning("{}: exited: {}", self.name, summary)

    def _leftovers(
        self, child: spawn.Child, snapshot: list[psutil.Process]
    ) -> list[psutil.Process]:
        """What is left of the child's tree: its group, the snapshot taken at
        stop, and the daemons it double-forked (re-parented to gosup)."""
        return snapshot + child.group_members() + spawn.adopted(self.name)

    async def _sweep_crashed(self, started_from: int | None = None) -> None:
        """List and kill what is left of the crashed run (``_crashed``), in one
        thread hop (gosup's children are read once for both lists: ``one_look``).

        Without ``started_from`` this is awaited: nothing of the program runs
        yet. After a start at once it runs beside the new run, which it must
        never touch: only processes started before ``started_from`` (the
        clock tick the new start began in, ``spawn.start_ticks``) are killed,
        and the children of those (a leftover's late fork).

        Most crashes leave nothing: when gosup adopts orphans, the run's group
        is empty and gosup has no child it did not start (``spawn.strays``),
        nothing of the run can be left, and no thread is asked (under a crash
        loop the sweeps' hops cost gosup more CPU than anything else did)."""
        if self._crashed is None:
            return
        (child, snapshot), self._crashed = self._crashed, None
        if not snapshot and self.ctx.adopts() and child.group_empty() and not spawn.strays():
            return

        def sweep() -> None:
            with spawn.one_look():
                procs = self._leftovers(child, snapshot) + self.ctx.marked_escapees(self.name)
            if started_from is not None:
                procs = spawn.started_before(procs, started_from)
            spawn.kill_tree(procs)

        if started_from is None:
            try:
                await asyncio.to_thread(sweep)
            except Exception as exc:
                logger.opt(exception=exc).error(
                    "{}: sweeping the run's leftovers failed", self.name
                )
            return
        task = asyncio.ensure_future(asyncio.to_thread(sweep))
        task.add_done_callback(self._swept)
        self._sweeps.add(task)

    def _swept(self, task: asyncio.Future[None]) -> None:
        self._sweeps.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error(
                "{}: sweeping the run's leftovers failed", self.name
            )

    def _exit_info(self, child: spawn.Child, code: int, uptime: float) -> dict[str, Any]:
        info = spawn.exit_fields(child.pid, code, uptime)
        crash = None
        if code != 0 and self.state is not S.STOPPING:
            crash = gopanic.parse(self.output.stderr.tail_text())
            sigkill = code == -signal.SIGKILL and not self._killed  # only then read the count
            if crash is None and sigkill and cgroup.oom_kills() > self._oom_kills_at_start:
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

    async def _on_stop(self, msg: Stop) -> None:
        await self._retire_old(f"stop ({msg.reason})")  # a stop during an overlap stops both
        if self.state is S.STOPPING and self._failed_stop is not None:
            self._cancel_failed_stop(msg.reason)  # ends STOPPED, no backoff
            self._wait_for(msg, frozenset({S.STOPPED}))
            return
        if self.state is S.STOPPING:
            if not msg.join:
                raise CommandError(f"{self.name} is already stopping")
            pending, self._start_after_stop = self._start_after_stop, None
            # The restart under way will not start again: say so, or its caller waits forever.
            self._refuse(pending, f"restart cancelled ({msg.reason})")
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
        await self._begin_stop(msg.reason)

    async def _begin_stop(self, reason: str, sig: int | None = None) -> None:
        child = self.child
        assert child is not None
        self._stop_reason = reason
        self._transition(S.STOPPING, "stopping", pid=child.pid, reason=reason)
        self._snapshot = await self._tree_of(child)
        sig = sig or self.spec.stop_signal
        self._stop_signal = sig
        child.signal_group(sig)
        child.signal_escaped(self._snapshot, sig)  # descendants that left the group too
        self._stop_deadline = self._deadline = self.ctx.clock() + self.spec.stop_timeout

    async def _tree_of(self, child: spawn.Child) -> list[psutil.Process]:
        """The child's tree and the daemons it double-forked, taken before any
        signal (descendants that left the group are only found through their
        parents). /proc reads, one process after another: in a thread."""

        def walk() -> list[psutil.Process]:
            return child.tree() + spawn.adopted(self.name)

        try:
            return await asyncio.to_thread(walk)
        except Exception as exc:  # the stop goes on: its group is signalled all the same
            logger.opt(exception=exc).error("{}: cannot list the process tree", self.name)
            return []

    async def _kill_tree(self) -> None:
        child = self.child
        if child is not None:
            self._killed = True
            child.signal_group(signal.SIGKILL)
            snapshot = self._snapshot
            # the tree again, and each process's children: walks of /proc, in a thread
            await asyncio.to_thread(lambda: spawn.kill_tree(snapshot + child.tree()))
            if not child.alive():  # gone already: make sure its exit is handled
                self._watch_exit(child)

    def _kill_pending(self) -> bool:
        return any(isinstance(m, Kill) for m in self._inbox)

    async def _on_kill(self, msg: Kill) -> None:
        await self._retire_old("killed")
        for retiring in list(self._retiring):
            await retiring.kill()
        if self.state in (S.STARTING, S.RUNNING):
            await self._begin_stop("killed")
        if self.state is S.STOPPING:
            await self._kill_tree()
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
            await asyncio.to_thread(spawn.kill_tree, survivors)  # each one's children: /proc walks
            await spawn.wait_gone(survivors, 2.0, self.ctx.clock)
        spawn.reap(leftovers)  # adopted daemons are gosup's children now: no zombies
        self._snapshot = []
        await self._retiring_gone()  # STOPPED means every process of the program is gone
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
            self._refuse(request, f"restart cancelled ({why})")

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
            await self._begin_stop(f"restart ({msg.reason})", msg.stop_signal)
            return
        if msg.reason in ("operator", "build"):  # a person acted: a fresh series (attempt 1)
            self.failures = 0
        if self._overlaps(msg):
            await self._begin_overlap(msg)
            return
        if self.state in (S.STARTING, S.RUNNING):
            self._start_after_stop = Start(reason=msg.reason, reply=msg.reply)
            await self._begin_stop(f"restart ({msg.reason})", msg.stop_signal)
            return
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

    # -- overlap restarts (restart_mode = "overlap", core/overlap.py) ----------------

    def _overlaps(self, msg: Restart) -> bool:
        """A planned restart of a RUNNING program in overlap mode (not one under way)."""
        return (
            self.spec.restart_mode is RestartMode.OVERLAP
            and self.state is S.RUNNING
            and self._old is None
            and self.child is not None
        )

    async def _begin_overlap(self, msg: Restart) -> None:
        """RUNNING -> STARTING: the replacement starts; the old process keeps serving."""
        old = self.child
        assert old is not None
        self._old = OldRun(
            child=old,
            pipes=self.output.hand_over(),
            started_at=self.started_at,
            reason=msg.reason,
            stop_signal=msg.stop_signal or self.spec.stop_signal,
            request=msg,
        )
        self.child = None
        logger.info("{}: overlap restart ({}): starting a replacement", self.name, msg.reason)
        await self._spawn()

    async def _take_over(self) -> None:
        """The replacement is RUNNING: stop the old process beside it."""
        old, self._old = self._old, None
        assert old is not None
        reason = f"restart ({old.reason})"
        await self._retire(
            Retiring(old.child, old.pipes, old.started_at, reason, old.stop_signal, old.request)
        )

    async def _overlap_failed(
        self, reason: str, error: str, replacement: spawn.Child | None
    ) -> None:
        """The replacement crashed, never got ready or could not start: STARTING ->
        RUNNING with the old process, which never stopped serving; ``replacement``
        (still running) is stopped beside it."""
        old, self._old = self._old, None
        assert old is not None
        self._deadline = None
        self._record(
            "restart_failed",
            reason=reason,
            error=error,
            pid=replacement.pid if replacement is not None else None,
            restart=old.reason,
        )
        logger.warning("{}: overlap restart failed ({}): {}", self.name, reason, error)
        new_pipes = self.output.hand_over()
        self.output.adopt(old.pipes)
        self.child, self.started_at = old.child, old.started_at
        self._transition(S.RUNNING)  # STARTING -> RUNNING: the old run, never stopped
        if replacement is not None:
            stop_signal = self.spec.stop_signal
            await self._retire(
                Retiring(replacement, new_pipes, self.ctx.clock(), "restart_failed", stop_signal)
            )
        request = old.request
        if request is not None and request.reply is not None and not request.reply.done():
            why = f"restart failed ({reason}): {error}; pid {old.child.pid} keeps serving"
            request.reply.set_exception(RestartFailed(f"{self.name}: {why}", reason, error))

    async def _replacement_crashed(self, child: spawn.Child, code: int) -> None:
        """The replacement exited while STARTING: its exit, then the old run goes on."""
        await self.output.drain(DRAIN_TIMEOUT)
        info = self._exit_info(child, code, self.ctx.clock() - (self.started_at or 0.0))
        self._record("exited", **info)
        # finding the group's members scans the process table: off the loop
        await asyncio.to_thread(lambda: spawn.kill_tree(child.group_members()))
        self.child = None
        await self._overlap_failed("exited", _exit_summary(info), None)
        await self._run_ended(child, None)

    async def _retire(self, retiring: Retiring) -> None:
        self._record("stopping", pid=retiring.child.pid, reason=retiring.reason)
        await retiring.begin()  # its exit arrives as _Exited (the callback of _spawn)
        self._retiring.append(retiring)
        loop = asyncio.get_running_loop()
        loop.call_later(self.spec.stop_timeout, self.post, _RetireTimeout(retiring.child))

    async def _retire_old(self, reason: str) -> None:
        """A stop or kill during an overlap: the old process is stopped too."""
        if self._old is None:
            return
        old, self._old = self._old, None
        self._refuse(old.request, f"restart cancelled ({reason})")
        await self._retire(Retiring(old.child, old.pipes, old.started_at, reason, old.stop_signal))

    def _refuse(self, request: Message | None, why: str) -> None:
        if request is not None and request.reply is not None and not request.reply.done():
            request.reply.set_exception(CommandError(f"{self.name}: {why}"))

    async def _on_retire_timeout(self, msg: _RetireTimeout) -> None:
        for retiring in list(self._retiring):
            if retiring.child is msg.child and not msg.child.exited.done():
                await retiring.kill()

    async def _beside_exited(self, child: spawn.Child, code: int) -> bool:
        """The exit of a process beside the current run: the old one of an overlap
        (by itself, before the takeover), or one being retired."""
        if self._old is not None and child is self._old.child:
            # The old process died before its replacement was ready: record it;
            # the replacement's start goes on, and the restart's answer is its outcome.
            old, self._old = self._old, None
            await old.pipes.drain(DRAIN_TIMEOUT)
            retiring = Retiring(child, old.pipes, old.started_at, "", old.stop_signal)
            self._record("exited", **retiring.exit_info(code, self.ctx.clock))
            await asyncio.to_thread(retiring.sweep)  # scans the process table
            if old.request is not None:
                self._wait_for(old.request, frozenset({S.RUNNING}))
            await self._run_ended(child, None)
            return True
        found = [r for r in self._retiring if r.child is child]
        if not found:
            return False
        retiring = found[0]
        self._retiring.remove(retiring)
        await retiring.pipes.drain(DRAIN_TIMEOUT)
        await asyncio.to_thread(retiring.sweep)
        info = retiring.exit_info(code, self.ctx.clock)
        self._record("exited", **info)
        self._record("stopped", pid=child.pid, reason=retiring.reason, killed=retiring.killed)
        logger.info("{}: pid {} stopped ({})", self.name, child.pid, retiring.reason)
        await self._run_ended(child, retiring.stop_signal)
        if retiring.request is not None:
            self._reply(retiring.request, f"{self._describe()} (replaced pid {child.pid})")
        return True

    async def _retiring_gone(self) -> None:
        """Wait (within what is left of stop_timeout) for every retiring process, then kill."""
        for retiring in list(self._retiring):
            budget = max(self._stop_deadline - self.ctx.clock(), 0.0)
            if not retiring.child.exited.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(budget):
                        await asyncio.shield(retiring.child.exited)
            if not retiring.child.exited.done():
                await retiring.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await asyncio.shield(retiring.child.exited)
            if retiring.child.exited.done():
                await self._beside_exited(retiring.child, retiring.child.exited.result())


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
