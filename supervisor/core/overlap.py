"""The parts of an overlap restart (``restart_mode = "overlap"``, DESIGN §3).

A planned restart of a program with ``restart_mode = "overlap"`` starts the
replacement first, with the same inherited sockets, and keeps the old
process serving until the replacement is RUNNING (its readiness probe
passed, else it stayed up ``start_seconds``). Then the old process gets its
``stop_signal`` (a Go server calls ``http.Server.Shutdown`` and finishes its
in-flight requests). A replacement that crashes or never gets ready is
stopped instead, the old process keeps serving, and ``restart_failed`` says
why.

The Program's actor does the deciding (core/program.py: while the
replacement starts, the program is STARTING with the replacement as its
child and the old run kept here as an ``OldRun``). This module holds the two
pieces of state it needs and the stop of a process beside the running one
(``Retiring``): the old run after the takeover, or a replacement that
failed. Such a stop is the same as any stop (stop_signal to the group and to
descendants that left it, SIGKILL to the whole tree after stop_timeout),
only it does not change the program's state.

``shared_port_warnings`` is ``gosup check``'s word on readiness in overlap
mode: an http or tcp ready probe on one of the program's own sockets may be
answered by the old process (both accept on it), so without ``{pid}`` it can
declare the replacement ready before it is (docs/zero-downtime.md).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from supervisor.config import AppConfig, ProbeKind, ProgramSpec, RestartMode, is_loopback_host
from supervisor.core import spawn
from supervisor.core.output import RunPipes

if TYPE_CHECKING:  # only named in annotations here
    import psutil


@dataclass
class OldRun:
    """The process an overlap restart replaces; it serves until the takeover."""

    child: spawn.Child
    pipes: RunPipes  # its output, still feeding the program's log files
    started_at: float | None
    reason: str  # the restart's reason (operator, leak, unhealthy, config, build)
    stop_signal: int  # what it is stopped with at the takeover (SIGQUIT for leak evidence)
    request: Any = None  # the Restart message, answered once the old process is gone


@dataclass
class Retiring:
    """A process being stopped beside the program's current run."""

    child: spawn.Child
    pipes: RunPipes
    started_at: float | None
    reason: str  # the stop's reason in the history ("restart (operator)", "restart_failed")
    stop_signal: int
    request: Any = None  # answered once it is gone
    snapshot: list[psutil.Process] = field(default_factory=list)
    killed: bool = False

    async def begin(self) -> None:
        """Send the stop signal to its group and to descendants that left it
        (its tree is taken first, in a thread: a walk of all of /proc)."""
        self.snapshot = await asyncio.to_thread(self.child.tree)
        self.child.signal_group(self.stop_signal)
        self.child.signal_escaped(self.snapshot, self.stop_signal)

    async def kill(self) -> None:
        """stop_timeout passed (or a Kill): SIGKILL the whole tree (in a thread)."""
        self.killed = True
        self.child.signal_group(signal.SIGKILL)
        snapshot, child = self.snapshot, self.child
        await asyncio.to_thread(lambda: spawn.kill_tree(snapshot + child.tree()))

    def sweep(self) -> None:
        """The main process is gone: what is left of its tree goes too (in a
        thread: finding its group's members scans the process table)."""
        left = spawn.alive(self.snapshot + self.child.group_members())
        if left:
            self.killed = True
            spawn.kill_tree(left)
        self.snapshot = []

    def exit_info(self, code: int, clock: Callable[[], float]) -> dict[str, Any]:
        uptime = clock() - self.started_at if self.started_at is not None else 0.0
        return spawn.exit_fields(self.child.pid, code, uptime)


def shared_port_warnings(config: AppConfig) -> list[str]:
    """A warning per overlap program whose ready probe is on its own socket without {pid}."""
    found = []
    for spec in config.programs:
        probe = spec.ready
        if spec.restart_mode is not RestartMode.OVERLAP or probe is None or probe.names_pid:
            continue
        if probe.kind not in (ProbeKind.HTTP, ProbeKind.TCP) or not isinstance(probe.target, str):
            continue
        address = _probe_address(probe.kind, probe.target)
        socket = _own_socket(spec, address) if address is not None else None
        if socket is not None:
            found.append(
                f"{config.path}: programs.{spec.name}.ready.{probe.kind.value}: {probe.target} "
                f'is on the program\'s own socket {socket}: with restart_mode = "overlap" the '
                "old process may answer it and the replacement is taken as ready too early; "
                "use notify = true, or an http or exec probe with {pid} "
                "(docs/zero-downtime.md)"
            )
    return found


def _probe_address(kind: ProbeKind, target: str) -> tuple[str, int] | None:
    if kind is ProbeKind.TCP:
        host, _, port_text = target.rpartition(":")
        return (host.strip("[]"), int(port_text)) if port_text.isdigit() else None
    parts = urlsplit(target)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return parts.hostname or "", port


def _own_socket(spec: ProgramSpec, address: tuple[str, int]) -> str | None:
    """The program's tcp socket that ``address`` reaches, if any."""
    host, port = address
    for sock in spec.sockets:
        if sock.family == "unix" or not isinstance(sock.address, tuple):
            continue
        bound, bound_port = sock.address
        if bound_port == port and (_same_host(bound, host) or _any_host(bound)):
            return sock.text
    return None


def _any_host(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "*")


def _same_host(a: str, b: str) -> bool:
    return a == b or (is_loopback_host(a) and is_loopback_host(b))
