"""Development mode (``gosup run --dev``): build before the first start,
rebuild and restart on a source change, apply app.toml on save.

What a developer leaves running all day has to be trusted with a broken
save, so three rules shape this module:

- A failed build changes nothing: the process running the last good build
  keeps running, and the compiler's errors are printed where they are seen.
  (``go build`` writes its output to a temporary file and renames it over
  the old binary only on success; the running process keeps its own inode.)
- The newest source wins: a change that arrives while a build runs kills
  that build (its whole process group) and, once the sources have been quiet
  for ``debounce``, builds again. Building a version already known to be
  stale only to restart twice is slower than starting over, and Go's build
  cache keeps every package that did finish.
- Nothing here touches a child: starts and restarts are messages to the
  Program, like everybody else's.

Which files count as sources, the watchers, and the build runner itself are
in builder.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import stat
import sys
import time
from pathlib import Path

from loguru import logger

from supervisor import fileops
from supervisor.config import BuildSpec, ConfigError, ProgramSpec
from supervisor.core import spawn
from supervisor.core.output import TerminalEcho
from supervisor.core.program import CommandError, Message, Program, Restart, Start
from supervisor.core.states import ProcessState
from supervisor.service import builder, daemon

S = ProcessState
CONFIG_DEBOUNCE = 0.2
# A change seen in a state not listed here (STOPPED by an operator, STOPPING)
# is built but not started: dev mode must not undo an operator's stop.
_RESTARTABLE = frozenset({S.STARTING, S.RUNNING, S.BACKOFF, S.EXITED, S.FATAL})


# -- building one program -------------------------------------------------------------


def _sink(name: str, echo_width: int | None) -> builder.Sink:
    if echo_width is None:
        return builder.LogLines(name)
    return TerminalEcho(name, echo_width, colour=sys.stdout.isatty())


def _binary(program: Program, env: dict[str, str]) -> Path | None:
    """The file the program runs, which the build writes (never a source); found
    as a start finds it, though it may not exist before the first build."""
    spec = program.spec
    found = spawn.locate_executable(spec.command[0], spec.directory, env)
    return Path(found) if found else None


def _own_output() -> tuple[Path, ...]:
    """The files gosup's own stdout and stderr go to (``gosup run --dev 2>run.log``
    in the project): a watch of "**" must not rebuild because gosup said "changed"."""
    found = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                found.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
    return tuple(found)


class DevBuild:
    """Builds one program before its first start, and again on every source change."""

    holds_autostart = True  # the daemon leaves the first start to us: after a good build

    def __init__(self, sup: daemon.Supervisor, program: Program, spec: BuildSpec) -> None:
        self.program = program
        self.spec = spec
        self.history = sup.history
        marks = spawn.marks(sup.config.supervisor.state_dir, program.name)
        self.env = builder.build_environment(program.spec, marks)
        self.sink = _sink(program.name, sup.ctx.echo_width)
        own = sup.config.supervisor
        never = (own.state_dir, own.log_dir, sup.config.path, *_own_output())
        self.watcher = builder.Watcher(
            spec.directory,
            recursive=True,
            wanted=builder.SourceFilter(spec, never, _binary(program, self.env)),
            notify=self._on_change,
        )
        self._autostart_pending = program.spec.autostart
        self._changed = asyncio.Event()
        self._changed_path = ""
        self._cancel_reason = "stopped"
        self._task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.watcher.start()
        self._changed.set()  # the first build needs no change
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"build:{self.program.name}"
        )

    def keeps(self, spec: ProgramSpec) -> bool:
        """A reload that updates the program in place and leaves its [build]
        as it is keeps this watch: nothing is rebuilt, nothing restarted."""
        return spec.build == self.spec

    async def close(self) -> None:
        self._cancel_reason = "stopped"
        for task in [self._task, *self._requests]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.watcher.close()

    def _on_change(self, path: str) -> None:
        self._changed_path = os.path.relpath(path, self.spec.directory)
        self._changed.set()

    async def _run(self) -> None:
        first = True
        while True:
            await self._changed.wait()
            if not first:
                logger.info("{}: {} changed", self.program.name, self._changed_path)
                cap = max(2.0, 10 * self.spec.debounce)  # a file rewritten forever still builds
                await builder.settle(self._changed, self.spec.debounce, cap)
            first = False
            self._changed.clear()
            try:
                result = await self._build_unless_changed()
                if result is not None:
                    self._apply(result)
            except Exception as exc:  # a bug: say so, keep watching
                logger.opt(exception=exc).error("{}: internal error in dev mode", self.program.name)

    async def _build_unless_changed(self) -> builder.BuildResult | None:
        """Build; a change before the build ends kills it and returns None."""
        loop = asyncio.get_running_loop()
        build = loop.create_task(self._build())
        changed = loop.create_task(self._changed.wait())
        try:
            done, _ = await asyncio.wait([build, changed], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # close(): the build dies with us
            changed.cancel()
            await _cancelled(build)
            raise
        changed.cancel()
        if build in done:
            return build.result()
        self._cancel_reason = "superseded"
        await _cancelled(build)
        logger.info("{}: sources changed during the build: starting over", self.program.name)
        return None

    async def _build(self) -> builder.BuildResult:
        command = list(self.spec.command)
        name = self.program.name
        self.history.record("build_started", name, command=command)
        logger.info("{}: building: {}", name, shlex.join(command))
        output = builder.BuildOutput(self.sink)
        began = time.monotonic()
        try:
            return await builder.run(self.spec, self.env, output)
        except asyncio.CancelledError:
            self.history.record(
                "build_failed",
                name,
                command=command,
                duration_s=round(time.monotonic() - began, 3),
                exit_code=None,
                output_tail=output.tail(),
                reason=self._cancel_reason,
            )
            raise

    def _apply(self, result: builder.BuildResult) -> None:
        """A good build starts or restarts the program; a failed one changes nothing."""
        name, took = self.program.name, result.duration_s
        if not result.ok:
            self._report_failure(result)
            return
        self.history.record(
            "build_succeeded", name, command=list(self.spec.command), duration_s=took
        )
        pending, self._autostart_pending = self._autostart_pending, False
        state = self.program.state
        if pending and state is S.STOPPED:
            logger.info("{}: built in {:.2f}s; starting it", name, took)
            self._request(Start(reason="autostart"))
        elif state in _RESTARTABLE:
            logger.info("{}: built in {:.2f}s; restarting it", name, took)
            self._request(Restart(reason="build"))
        else:
            logger.info("{}: built in {:.2f}s; not starting it (it is {})", name, took, state.value)

    def _report_failure(self, result: builder.BuildResult) -> None:
        self.history.record(
            "build_failed",
            self.program.name,
            command=list(self.spec.command),
            duration_s=result.duration_s,
            exit_code=result.exit_code,
            output_tail=result.output_tail,
        )
        code = result.exit_code
        how = "could not start" if code is None else f"exit code {code}"
        logger.error(
            "{}: BUILD FAILED ({}, {:.2f}s); {}\n{}",
            self.program.name,
            how,
            result.duration_s,
            self._what_runs(),
            _indent(result.output_tail),
        )

    def _what_runs(self) -> str:
        pid = self.program.pid
        if pid is None:
            return "nothing started yet: the first good build starts it"
        return f"pid {pid} keeps running the last good build"

    def _request(self, msg: Message) -> None:
        task = asyncio.get_running_loop().create_task(self._ask(msg))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _ask(self, msg: Message) -> None:
        try:
            outcome = await self.program.request(msg)
        except CommandError as exc:
            logger.warning("{}: the new build did not come up: {}", self.program.name, exc)
        else:
            logger.info("{}: new build: {}", self.program.name, outcome)


async def _cancelled(task: asyncio.Task[builder.BuildResult]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines()) or "    (no output)"


# -- app.toml ---------------------------------------------------------------------------


class ConfigWatch:
    """Applies app.toml on save, as ``gosup reload`` does; a broken save changes nothing."""

    def __init__(self, sup: daemon.Supervisor) -> None:
        self.sup = sup
        self.path = sup.config.path
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.watcher = builder.Watcher(
            self.path.parent,
            recursive=False,
            wanted=lambda path: path == str(self.path),
            notify=lambda path: self._changed.set(),
        )

    async def start(self) -> None:
        await self.watcher.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dev:app.toml")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.watcher.close()

    async def _run(self) -> None:
        while True:
            await self._changed.wait()
            await builder.settle(self._changed, CONFIG_DEBOUNCE, 2.0)
            try:
                await self._apply()
            except Exception as exc:  # a bug: say so, keep watching
                logger.opt(exception=exc).error("applying {} failed", self.path.name)

    async def _apply(self) -> None:
        try:
            sha: str | None = fileops.sha256_file(self.path)
        except OSError:
            sha = None  # reload() says what is wrong with it
        if sha == self.sup.config.sha256:
            logger.debug("{} saved without a change", self.path.name)
            return
        logger.info("{} saved: applying it", self.path.name)
        try:
            await self.sup.reload()
        except ConfigError as exc:
            logger.error(
                "{} not applied, nothing changed ({} error{}):\n{}",
                self.path.name,
                len(exc.errors),
                "" if len(exc.errors) == 1 else "s",
                _indent("\n".join(exc.errors)),
            )


# -- the parts the composition root wires in -----------------------------------------


def build_for(sup: daemon.Supervisor, program: Program) -> DevBuild | None:
    """A program's dev-mode build (only with ``--dev`` and a [build] section)."""
    spec = program.spec.build
    if spec is None:
        return None
    if not sup.dev:
        logger.info("{}: [build] is used only by `gosup run --dev`: not building", program.name)
        return None
    return DevBuild(sup, program, spec)
