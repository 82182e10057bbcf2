"""sd_notify: tell systemd when gosup is ready, alive, reloading and stopping.

The protocol is one datagram per message to the ``AF_UNIX`` socket named in
``$NOTIFY_SOCKET`` (a path, or an abstract address written with a leading
``@``). Without that variable every call is a no-op, so the same gosup runs
in a terminal, a container and under systemd.

What is sent, and when (``Type=notify`` in ``systemd/gosup.service``):

- ``READY=1`` once every autostart program is RUNNING (ready, when it has a
  ``[ready]`` probe) or has exited for good with a success code; never while
  one is FATAL, so ``systemctl start`` fails rather than report a broken
  service as started. It is evaluated one loop iteration after a state
  change, because a crash moves a program through EXITED and on to BACKOFF
  within one handler: only the settled state counts.
- ``STATUS=4 running, 1 backoff`` whenever it changes; until READY=1 it also
  names the program that holds it up and why (``; waiting for api: fatal
  (exit code 1: bind: permission denied)``).
- ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2``, from a ``loop.call_later``
  chain and never from a thread: if the event loop wedges, the pings stop
  and systemd kills gosup (``WatchdogSec=``), which is the whole point.
- ``RELOADING=1`` when an app.toml reload is applied (the
  ``supervisor_reloaded`` history record is written before the difference is
  applied), then ``READY=1`` again once the new set of programs has settled.
- ``STOPPING=1`` at the first state change after the shutdown began (or at
  the latest when the service closes).

Children never see ``NOTIFY_SOCKET`` (``spawn.child_environment`` removes
it), and ``NotifyAccess=main`` makes systemd ignore anyone else anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.core.program import Program
from supervisor.core.states import ProcessState
from supervisor.service.statuspage import exit_reason

if TYPE_CHECKING:
    from supervisor.service.daemon import Supervisor

S = ProcessState
# Pings no closer than this: a WATCHDOG_USEC of a few microseconds (a typo, or
# garbage) would otherwise turn the call_later chain into a busy loop.
WATCHDOG_MIN_INTERVAL = 0.01


def socket_address(value: str) -> str | bytes:
    """The address to ``sendto`` for a ``$NOTIFY_SOCKET`` value ("@x" is abstract)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET must be an absolute path or start with '@': {value!r}")
    return value


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when off."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # the watchdog is meant for another process
    try:
        value = int(usec)
    except ValueError:
        return None
    return max(value / 2e6, WATCHDOG_MIN_INTERVAL) if value > 0 else None


class Notifier:
    """Sends sd_notify messages; a no-op when ``$NOTIFY_SOCKET`` is not set."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET")
        self.address = socket_address(raw) if raw else None
        self._sock: socket.socket | None = None
        if self.address is not None:
            # Non-blocking: a systemd that is slow to read its notify socket
            # (a backlog) costs a lost message, never a stalled event loop.
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            self._sock = socket.socket(socket.AF_UNIX, kind)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when it could not be sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # systemd gone or its queue full: never worth waiting for
            logger.debug("sd_notify {} failed: {}", lines, exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(states: list[ProcessState]) -> str:
    """The STATUS= text: "4 running, 1 backoff" (lifecycle order), or "no programs"."""
    if not states:
        return "no programs"
    counts = collections.Counter(states)
    return ", ".join(f"{counts[s]} {s.value.lower()}" for s in ProcessState if counts[s])


class SystemdService:
    """The sd_notify side of one Supervisor (a daemon service)."""

    def __init__(self, sup: Supervisor, notifier: Notifier, watchdog: float | None) -> None:
        self.sup = sup
        self.notifier = notifier
        self.watchdog = watchdog
        self.ready = False
        self.stopping_sent = False
        self._last_status = ""
        self._check_pending = False
        self._ping_handle: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        # Programs are added after services start and copy these listeners.
        self.sup.state_listeners.append(self._on_state)
        self.sup.history.add_listener(self._on_record)
        if self.watchdog is not None:
            logger.info("systemd watchdog: pinging every {:.3g}s", self.watchdog)
            self._ping()
        self._schedule_check()

    async def close(self) -> None:
        if self._ping_handle is not None:
            self._ping_handle.cancel()
        self._send_stopping()
        with contextlib.suppress(ValueError):
            self.sup.state_listeners.remove(self._on_state)
        with contextlib.suppress(ValueError):
            self.sup.history.remove_listener(self._on_record)
        self.notifier.close()

    # -- watchdog ----------------------------------------------------------------

    def _ping(self) -> None:
        assert self.watchdog is not None
        self.notifier.send("WATCHDOG=1")
        loop = asyncio.get_running_loop()
        self._ping_handle = loop.call_later(self.watchdog, self._ping)

    # -- readiness and status -------------------------------------------------------

    def _on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
        if self.sup.shutting_down:
            self._send_stopping()
        self._schedule_check()

    def _on_record(self, rec: dict[str, object]) -> None:
        if rec.get("event") == "supervisor_reloaded":
            self.ready = False
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            self._schedule_check()

    def _schedule_check(self) -> None:
        # One check per loop iteration, however many transitions happened in it.
        if not self._check_pending:
            self._check_pending = True
            asyncio.get_running_loop().call_soon(self._check)

    def _check(self) -> None:
        self._check_pending = False
        status = status_line([p.state for p in self.sup.programs.values()])
        waiting = None if self.ready else self._blocker()
        if self.sup.shutting_down:
            status = f"stopping: {status}"
        elif waiting is not None:
            status = f"{status}; waiting for {waiting}"
        lines = []
        if status != self._last_status:
            self._last_status = status
            lines.append(f"STATUS={status}")
        if not self.ready and not self.sup.shutting_down and waiting is None:
            self.ready = True
            lines.append("READY=1")
            logger.info("ready: {}", status)
        if lines:
            self.notifier.send(*lines)

    def _blocker(self) -> str | None:
        """The first autostart program of the current config that is not up, and why."""
        for spec in self.sup.config.programs:
            if not spec.autostart:
                continue
            program = self.sup.programs.get(spec.name)
            if program is None or program.spec != spec:
                return f"{spec.name}: not added yet"
            if not _up(program):
                return f"{spec.name}: {program.state.value.lower()}{_why(program)}"
        return None

    def _send_stopping(self) -> None:
        if not self.stopping_sent:
            self.stopping_sent = True
            self.notifier.send("STOPPING=1", "STATUS=stopping")


def _up(program: Program) -> bool:
    """RUNNING, or done for good with a success code (a one-shot job)."""
    if program.state is S.RUNNING:
        return True
    last = program.last_exit or {}
    done = program.state is S.EXITED and not last.get("reason")
    return done and last.get("exit_code") in program.spec.success_exit_codes


def _why(program: Program) -> str:
    """`` (exit code 1: bind: permission denied)`` from the last exit, if any
    (worded as the status page words it)."""
    if program.state in (S.STARTING, S.RUNNING) or not program.last_exit:
        return ""
    return f" ({exit_reason(program.last_exit)})"


def make_service(sup: Supervisor) -> SystemdService | None:
    """The daemon service factory: nothing to do unless systemd gave us a socket."""
    try:
        notifier = Notifier()
    except ValueError as exc:
        logger.error("sd_notify disabled: {}", exc)
        return None
    if not notifier.enabled:
        return None
    # Nothing gosup runs inherits systemd's socket or watchdog: every child
    # starts from core.spawn.base_environment(), which leaves them out.
    return SystemdService(sup, notifier, watchdog_interval(os.environ))
