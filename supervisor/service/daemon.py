"""The Supervisor: loads the config, owns the programs, turns signals into
commands, applies a reloaded app.toml, and shuts everything down in order.

Signal handlers only enqueue (``signals.SignalRouter`` + ``put_nowait``);
``_dispatch_signals`` is the one task that acts on them, so nothing runs
inside a handler and nothing races with the programs' own tasks. Once gosup
is stopping for good the signals it handles are ignored, never handed back
to their default action (SIGTERM would kill the close half-way).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from supervisor import __version__
from supervisor import config as configmod
from supervisor.config import AppConfig, ProgramSpec
from supervisor.core import cgroup, output, sockets, spawn
from supervisor.core.program import (
    CommandError,
    Context,
    Kill,
    Program,
    Reconfigure,
    SendSignal,
    Start,
    Stop,
)
from supervisor.core.states import SIGNALLABLE_STATES, ProcessState
from supervisor.core.tasks import cancel_and_wait
from supervisor.history import History
from supervisor.protocol import HISTORY_NAME
from supervisor.service import cpuweight
from supervisor.service.signals import SignalRouter

# How a program's child runs (DESIGN §4): a reload that changes one of these
# restarts the program; any other change (limits, probes, logs, backoff,
# config_files, stop and restart settings) is applied to the running process.
# go_env is here because it changes the environment the child is given.
RUN_FIELDS = (
    "command",
    "environment",
    "directory",
    "user",
    "group",
    "sockets",
    "capabilities",
    "go_env",
)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, *FORWARDED_SIGNALS)


class StartupError(Exception):
    """gosup cannot start here (another gosup owns the state_dir, ...): exit 1."""


def privilege_errors(config: AppConfig, previous: AppConfig | None = None) -> list[str]:
    """A ``user``/``group`` switch gosup has no right to make is a config error.

    (An unknown user is not: it may be created later by provisioning, so it
    fails the program's start like a missing binary, and gosup keeps running.)
    A program whose spec is the very one of ``previous`` (a reload's
    unchanged programs) passed this check then, and gosup's own rights do
    not change: it is not looked up again.
    """
    kept = {p.name: p for p in previous.programs} if previous is not None else {}
    errors = []
    for spec in config.programs:
        if kept.get(spec.name) is spec:
            continue
        try:
            spawn.resolve_identity(spec.user, spec.group)
        except spawn.PrivilegeError as exc:
            errors.append(f"{config.path}: programs.{spec.name}.user: {exc}")
        except spawn.SpawnError:
            pass
        for why in spawn.capability_errors(spec.capabilities):
            errors.append(f"{config.path}: programs.{spec.name}.capabilities: {why}")
    return errors


class Service(Protocol):
    """A supervisor-wide part (control socket, sampler, sd_notify, metrics ...)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class Attachment(Service, Protocol):
    """Something that lives beside one program (config sync, dev-mode build).

    ``holds_autostart``: the attachment posts the program's first Start itself
    (dev mode starts it only after a good build). When a reload updates the
    program in place, its attachments are closed and made again from the new
    spec, except one with a ``keeps(spec)`` method that answers true.
    """

    holds_autostart: bool


# Makes a program's attachment, or None when the program needs none.
AttachmentFactory = Callable[["Supervisor", Program], Attachment | None]


def runs_differently(old: ProgramSpec, new: ProgramSpec) -> bool:
    """True when ``new`` changes how the child runs (RUN_FIELDS): a restart."""
    return any(getattr(old, key, None) != getattr(new, key, None) for key in RUN_FIELDS)


def prepare_state_dir(path: Path) -> None:
    """Create the state directory private to gosup's user (0700). (When it
    vanishes while gosup runs, the history makes it again at its next
    record: ``History``.)"""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


class Supervisor:
    """The programs, the signals, reloads and the orderly stop.

    Built by the composition root (``service/app.py``), which hands it every
    part by name: ``services`` start in order before the first program and
    close in reverse after the last; each of ``attachments`` may attach a
    helper to every program it adds.
    """

    def __init__(self, config: AppConfig, *, echo: bool = False, dev: bool = False) -> None:
        if errors := privilege_errors(config):
            raise configmod.ConfigError(errors)
        self.config = config
        self.echo = echo
        self.dev = dev
        sup = config.supervisor
        prepare_state_dir(sup.state_dir)
        output.prepare_log_dir(sup.log_dir)  # 0750, whatever the umask
        self.history = History(
            sup.state_dir / HISTORY_NAME,
            on_listener_error=_listener_failed,
            max_size=sup.history_max_size,
            backups=sup.history_backups,
            on_write_error=_history_write_failed,
        )
        # The listening sockets of every program (``sockets``): bound in run()
        # and at each reload, kept across restarts, handed to the programs' runs.
        self.listeners = sockets.Listeners()
        self.ctx = Context(
            history=self.history,
            log_dir=sup.log_dir,
            echo_width=self._echo_width(config.programs),
            launcher=self.listeners.launch,
        )
        self.programs: dict[str, Program] = {}
        # program name -> its attachments, by the factory that made each
        self.attachments: dict[str, dict[AttachmentFactory, Attachment]] = {}
        self.services: list[Service] = []  # set by the composition root before run()
        self.attachment_factories: list[AttachmentFactory] = []  # likewise
        self.state_listeners: list[Callable[[Program, Any, Any], None]] = []
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._done = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()  # SIGHUP reloads under way
        self._leaving: set[Program] = set()  # removed by a reload, still stopping
        self._running_services: list[Service] = []
        self.shutting_down = False
        self._started = False
        self._left_unsettled = 0  # programs a reload removed since the heap was settled in full
        self.signals: SignalRouter | None = None  # while ``run`` runs (the reaper's SIGCHLD too)

    def _echo_width(self, programs: tuple[ProgramSpec, ...]) -> int | None:
        if not self.echo:
            return None
        return max((len(p.name) for p in programs), default=4)

    # -- life ------------------------------------------------------------------

    async def run(self) -> int:
        """Run until told to stop; return the exit code."""
        loop = asyncio.get_running_loop()
        router = self.signals = SignalRouter(loop)
        for sig in HANDLED_SIGNALS:
            router.on(sig, self._signals.put_nowait)
        if ignored := router.catch_ignored():  # else the programs would start ignoring them
            logger.info(
                "started with {} ignored: still ignored by gosup, at their default in programs",
                ", ".join(signal.Signals(sig).name for sig in ignored),
            )
        # Before any program starts: what busy programs take, gosup still gets.
        logger.log(*cpuweight.weigh_session(self.config.supervisor.nice))
        dispatcher = loop.create_task(self._dispatch_signals(), name="signals")
        try:
            for service in self.services:
                await service.start()
                self._running_services.append(service)
            # After the services: the control socket refused a second gosup
            # first, and the leftover sweep stopped a previous gosup's programs
            # (which may still hold these ports). ConfigError when one cannot be bound.
            self.listeners.open_for(self.config)
            # Recorded once the services are up: a gosup that the control
            # service refused (another one owns this state_dir) must leave no
            # started/stopped records in the running one's history.
            self.history.record(
                "supervisor_started", version=__version__, config_sha256=self.config.sha256
            )
            self._started = True
            logger.info(
                "gosup {} started with {} ({} programs)",
                __version__,
                self.config.path,
                len(self.config.programs),
            )
            # Under the reload lock: a reload (SIGHUP, or the control socket,
            # which already answers) must not diff against programs half added.
            async with self._reload_lock:
                for spec in self.config.programs:
                    if self.shutting_down:  # asked to stop meanwhile: add nothing more
                        break
                    await self._add_program(spec)
            _settle_heap()
            await self._done.wait()
        finally:
            # Ignored, not handed back: a SIGTERM from now on (systemd
            # repeating it, the programs all stopped) must not end gosup
            # before it has closed; nor SIGINT (KeyboardInterrupt) nor SIGHUP.
            # They stay ignored until the process exits: ``run`` is its life.
            for sig in HANDLED_SIGNALS:
                router.ignore(sig)
            # Our own tasks end before we close anything: a reload cancelled
            # here still runs its cleanup (a removed program's log files).
            await cancel_and_wait(dispatcher, *self._reloads)
            if self._shutdown_task is None:  # an error brought us here: still stop everything
                await self._stop_all()
            else:
                await self._shutdown_task
            try:
                await self._close()
            finally:
                router.close()
        return 0

    async def _add_program(self, spec: ProgramSpec) -> Program:
        program = Program(spec, self.ctx)
        # One listener that reads self.state_listeners at each change: a service
        # that closes (and removes its listener) is not called again by the
        # programs added while it was running.
        program.state_listeners.append(self._state_changed)
        self.programs[spec.name] = program
        program.launch()
        attached = await self._attach(program, {})
        # An attachment that must act before the first start (dev mode's
        # initial build) holds the autostart and posts the Start itself.
        held = any(att.holds_autostart for att in attached.values())
        if spec.autostart and not held:
            program.post(Start(reason="autostart"))
        return program

    async def _attach(
        self, program: Program, kept: dict[AttachmentFactory, Attachment]
    ) -> dict[AttachmentFactory, Attachment]:
        """Start the attachments ``program`` needs (besides ``kept``) and note them."""
        attached = dict(kept)
        self.attachments[program.name] = attached
        for factory in self.attachment_factories:
            if factory in kept:
                continue
            att = factory(self, program)
            if att is not None:
                await att.start()
                attached[factory] = att
        return attached

    async def _update_program(self, spec: ProgramSpec) -> None:
        """Apply a changed spec to the running program: no restart, same pid.

        Its attachments are made again from the new spec (a ConfigSync watches
        the new config_files, probes use the new settings), except those that
        say they keep (dev mode's build, when [build] did not change).
        """
        program = self.programs[spec.name]
        old = program.spec
        kept: dict[AttachmentFactory, Attachment] = {}
        for factory, att in self.attachments.pop(spec.name, {}).items():
            keeps = getattr(att, "keeps", None)
            if keeps is not None and keeps(spec):
                kept[factory] = att
            else:
                await _close_logged(att, spec.name)
        try:
            await program.request(Reconfigure(spec=spec))
        except CommandError as exc:  # a bug: the old spec stays; say so
            logger.error("{}: not updated: {}", spec.name, exc)
        await self._attach(program, kept)
        if spec.autostart and not old.autostart and program.state is ProcessState.STOPPED:
            program.post(Start(reason="autostart"))

    def _state_changed(self, program: Program, old: Any, new: Any) -> None:
        for listener in list(self.state_listeners):
            try:
                listener(program, old, new)
            except Exception as exc:  # the others must still hear of it
                logger.opt(exception=exc).error(
                    "{}: state listener {} failed", program.name, listener
                )

    async def _remove_program(self, name: str, reason: str) -> None:
        program = self.programs.pop(name)
        self._leaving.add(program)  # still within kill_all's reach until it is stopped
        try:
            for att in self.attachments.pop(name, {}).values():
                await _close_logged(att, name)  # a failure still stops the program
            with contextlib.suppress(CommandError):
                await program.request(Stop(reason=reason, join=True))
        finally:
            self._leaving.discard(program)
        await program.close()

    def shutdown(self) -> None:
        """Begin the orderly stop (idempotent); ``run`` returns once it is done."""
        if self._shutdown_task is None:
            self.shutting_down = True
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())

    async def _shutdown(self) -> None:
        logger.info("stopping {} programs", len(self.programs))
        async with self._reload_lock:  # a reload under way finishes first, then stops too
            await self._stop_all()
        self._done.set()

    async def _stop_all(self) -> None:
        """Stop programs in reverse order of start, within shutdown_timeout; then kill."""
        for name, attached in self.attachments.items():
            for att in attached.values():
                await _close_logged(att, name)
        self.attachments.clear()
        order = sorted(self.programs.values(), key=lambda p: p.start_seq, reverse=True)
        try:
            async with asyncio.timeout(self.config.supervisor.shutdown_timeout):
                for program in order:
                    with contextlib.suppress(CommandError):
                        await program.request(Stop(reason="shutdown", join=True))
        except TimeoutError:
            logger.error("shutdown_timeout passed: killing what still runs")
            await self.kill_all()

    async def kill_all(self) -> None:
        """SIGKILL every program's tree now, and wait until all are STOPPED."""
        # Both messages are posted before any await: nothing (a backoff ending,
        # say) can start a new child between the kill and the stop.
        replies: list[Awaitable[Any]] = []
        for p in [*self.programs.values(), *self._leaving]:
            replies += [p.send(Kill()), p.send(Stop(reason="killed", join=True))]
        await asyncio.gather(*replies, return_exceptions=True)

    async def _close(self) -> None:
        for service in reversed(self._running_services):
            await _close_logged(service, "gosup")
        self._running_services.clear()
        for program in self.programs.values():
            await program.close()
        self.listeners.close()
        if self._started:
            self.history.record(
                "supervisor_stopped", version=__version__, config_sha256=self.config.sha256
            )
            logger.info("gosup stopped")
        self.history.close()

    # -- signals -----------------------------------------------------------------

    async def _dispatch_signals(self) -> None:
        while True:
            sig = await self._signals.get()
            name = signal.Signals(sig).name
            if sig in STOP_SIGNALS:
                if self.shutting_down and sig == signal.SIGINT:
                    logger.warning("second SIGINT: killing every program now")
                    await self.kill_all()
                else:
                    logger.info("{}: stopping", name)
                    self.shutdown()
            elif sig == signal.SIGHUP:
                # A task of its own: a reload waits for stops (up to stop_timeout),
                # and SIGTERM or a second SIGINT must be acted on meanwhile.
                task = asyncio.get_running_loop().create_task(self._reload_on_signal())
                self._reloads.add(task)
                task.add_done_callback(self._reloads.discard)
            else:
                await self.forward_signal(sig, reason="forwarded")

    async def _reload_on_signal(self) -> None:
        logger.info("SIGHUP: reloading {}", self.config.path)
        try:
            await self.reload()
        except configmod.ConfigError as exc:
            logger.error("reload refused, nothing changed:\n{}", exc)
        except Exception as exc:  # a bug: say so; gosup keeps running
            logger.opt(exception=exc).error("reload failed: {}", exc)

    async def forward_signal(self, sig: int, reason: str) -> list[str]:
        """Send ``sig`` to every running program; return who got it."""
        got = []
        for program in list(self.programs.values()):
            if program.state in SIGNALLABLE_STATES:
                with contextlib.suppress(CommandError):
                    await program.request(SendSignal(signum=sig, reason=reason))
                    got.append(program.name)
        return got

    # -- reload --------------------------------------------------------------------

    async def reload(self) -> dict[str, list[str]]:
        """Re-read app.toml and apply only the difference.

        An invalid file raises ConfigError before anything changes. Added
        programs start and removed ones stop. A changed program restarts only
        when how its child runs changed (``changed``: RUN_FIELDS); any other
        change is applied to the running process (``updated``, same pid).
        Untouched programs keep running as they are.
        """
        async with self._reload_lock:
            if self.shutting_down:  # everything is being stopped: start nothing new
                logger.warning("reload ignored: gosup is shutting down")
                return {"added": [], "removed": [], "changed": [], "updated": []}
            # Off the loop: reading app.toml, and the user lookups (NSS may ask LDAP).
            new = await asyncio.to_thread(configmod.load, self.config.path)
            if errors := await asyncio.to_thread(privilege_errors, new, self.config):
                raise configmod.ConfigError(errors)
            # A socket that cannot be bound refuses the reload, nothing changed.
            self.listeners.open_for(new)
            cgroup.forget()  # the Go environment's limits are read again at the next start
            if new.supervisor != self.config.supervisor:
                logger.warning("[supervisor] changes take effect at the next gosup start")
            old_specs = {p.name: p for p in self.config.programs}
            new_specs = {p.name: p for p in new.programs}
            removed = [n for n in old_specs if n not in new_specs]
            added = [n for n in new_specs if n not in old_specs]
            # An unchanged program's spec is the very object it was (the
            # config's spec cache): ``is`` settles most of them at once.
            different = [
                n
                for n, spec in new_specs.items()
                if n in old_specs and spec is not old_specs[n] and spec != old_specs[n]
            ]
            changed = [n for n in different if runs_differently(old_specs[n], new_specs[n])]
            updated = [n for n in different if n not in changed]
            self.history.record(
                "supervisor_reloaded",
                version=__version__,
                config_sha256=new.sha256,
                added=added,
                removed=removed,
                changed=changed,
                updated=updated,
            )
            # The [supervisor] section in use stays the one gosup started with
            # (its state_dir holds our socket and history).
            self.config = dataclasses.replace(new, supervisor=self.config.supervisor)
            for name in removed:
                await self._remove_program(name, reason="removed by reload")
            for name in changed:
                await self._remove_program(name, reason="changed by reload")
                if not self.shutting_down:  # a stop may take long: gosup may be ending now
                    await self._add_program(new_specs[name])
            for name in updated:
                if not self.shutting_down and name in self.programs:
                    await self._update_program(new_specs[name])
            for name in added:
                if not self.shutting_down:
                    await self._add_program(new_specs[name])
            # Keep app.toml order for status listings.
            self.programs = {n: self.programs[n] for n in new_specs if n in self.programs}
            self.listeners.release_unused(self.config)
            self._settle_later(left=len(removed) + len(changed))
            logger.info(
                "reloaded: added {}, removed {}, restarted {}, updated in place {}",
                added,
                removed,
                changed,
                updated,
            )
            return {"added": added, "removed": removed, "changed": changed, "updated": updated}

    def _settle_later(self, left: int) -> None:
        """Settle the heap a second after a reload that removed or restarted
        ``left`` programs (not now: the collection takes tens of ms with many
        programs, and the restarts come first); in full once enough have left."""
        self._left_unsettled += left
        full = self._left_unsettled >= SETTLE_FULL_AFTER
        if full:
            self._left_unsettled = 0
        asyncio.get_running_loop().call_later(1.0, _settle_heap, full)


# Programs removed or restarted by reloads whose cycles may sit in the frozen
# heap, until a reload settles it in full (see _settle_heap).
SETTLE_FULL_AFTER = 64


def _settle_heap(full: bool = True) -> None:
    """Move what start-up (or a reload) built out of the cyclic collector's
    reach (``gc.freeze``, CPython's advice for long-lived servers): with 200
    programs a full collection walked it all on the loop, 35-60 ms of CPU
    each (issue 18). Then the C heap's free pages go back to the kernel.

    ``full``: what was frozen is collected too, so that a removed program's
    cycles (a few dozen objects) are not kept for good. That walks the whole
    heap on the loop: 100-280 ms at 1,000 programs, against 2-46 ms for what
    the reload itself built; so a reload settles in full only once
    SETTLE_FULL_AFTER programs have left since the last full settle."""
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    spawn.release_free_memory()


def _listener_failed(exc: BaseException) -> None:
    """A history listener (pid file, metrics, sd_notify) failed: the record is
    written all the same; the fault is logged with its traceback and counted
    (``History.listener_errors``)."""
    logger.opt(exception=exc).error("a history listener failed: {}", exc)


def _history_write_failed(message: str) -> None:
    """The history cannot be written (disk full, I/O error) or works again:
    one line per burst; the records wait in memory meanwhile, and supervision
    goes on (``History.write_errors``, exported as a metric)."""
    logger.error("{}", message)


async def _close_logged(part: Service, owner: str) -> None:
    """Close ``part``; a failure is logged with its traceback, never raised:
    the parts after it (and the programs) must still be closed."""
    try:
        await part.close()
    except Exception as exc:
        logger.opt(exception=exc).error("{}: closing {} failed: {}", owner, part, exc)
