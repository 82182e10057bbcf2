"""gosup's end of sd_notify for its programs (``[ready] notify = true``).

systemd's readiness protocol is the natural companion of the LISTEN_FDS
sockets (core/sockets.py): the program sends ``READY=1`` in a datagram to
the unix socket named by ``NOTIFY_SOCKET`` once it is initialised
(go-systemd's ``daemon.SdNotify(false, daemon.SdNotifyReady)``, or a few
lines of the standard library: examples/demo). Why gosup needs it: during an
overlap restart the old and the new process accept on the same inherited
socket, so an http or tcp probe on that port may be answered by the old
process and declare the replacement ready too early. A datagram carries the
sender's pid, checked by the kernel (``SO_PASSCRED``: every datagram comes
with ``SCM_CREDENTIALS``), so only the replacement itself can say it is ready.

One socket per gosup, ``<state_dir>/notify``, mode 0600 in the 0700 state
directory: only gosup's own user can reach it (a program that runs as
another ``user`` cannot: docs/zero-downtime.md says what to use then).
Whatever reaches it anyway is judged by its sender's pid, not trusted:

- a datagram whose sender is not one of gosup's own children (the main
  process of a run: systemd's ``NotifyAccess=main``; a helper the program
  started, a shell it did not ``exec``, another process on the host) is
  ignored and counted, like one without credentials, one larger than
  ``MAX_DATAGRAM`` (systemd's limit too) or one that is not ``KEY=VALUE``
  lines of UTF-8;
- ``READY=1`` from a child is kept (for the last ``REMEMBERED`` processes:
  it may arrive before its Program has the pid in hand) and ends the wait of
  the readiness prober (health/probing.py) for that very process, no other;
  ``STATUS=...`` is kept beside it and shown in a ``not_ready`` error. A
  process is its pid and its start time (/proc/PID/stat), so a pid the
  kernel reuses for a later run does not inherit an earlier READY=1.

Nothing blocks the loop: the socket is non-blocking and read by a reader
callback, at most ``BATCH`` datagrams per wake-up, so a flood costs bounded
work and cannot starve supervision. Files (fds) passed along are closed.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from loguru import logger

from supervisor.config import ProbeKind, ProgramSpec
from supervisor.core import spawn

SOCKET_NAME = "notify"  # under state_dir; short, so it fits where gosup.sock fits
MAX_DATAGRAM = 4096  # systemd's NOTIFY_BUFFER_MAX; a longer datagram is ignored, not cut
BATCH = 64  # datagrams read per wake-up of the loop
REMEMBERED = 256  # pids whose READY=1 (and STATUS=) are kept for a wait that comes later
STATUS_MAX = 200  # characters of STATUS= kept
WARN_EVERY = 10.0  # seconds between two warnings of one kind about ignored datagrams
_UCRED = struct.Struct("3i")  # pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(16 * 4)  # creds, a few fds
Process = tuple[int, int]  # pid, start time in clock ticks since boot


class NotifySocket:
    """The socket, the READY=1 and STATUS= each child sent, and the waits for them."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._sock: socket.socket | None = None
        # (pid, start time): what that process said; a pid alone may be reused
        self._said: collections.OrderedDict[Process, dict[str, str]] = collections.OrderedDict()
        self._waiters: dict[Process, list[asyncio.Future[None]]] = {}
        self.ignored: collections.Counter[str] = collections.Counter()  # reason -> datagrams
        self._warned_at: dict[str, float] = {}  # reason -> when it was last logged

    # -- the service (service/app.py starts it before any program) ---------------

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            # The file takes the socket inode's mode at bind(): never open to others.
            os.fchmod(sock.fileno(), 0o600)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a previous gosup's (we hold the control lock)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot create the notify socket {self.path}: {exc}") from None
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_readable)

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        for waiters in self._waiters.values():
            for fut in waiters:
                fut.cancel()
        self._waiters.clear()

    def environment(self, spec: ProgramSpec) -> Mapping[str, str]:
        """The child environment provider: NOTIFY_SOCKET for a ``notify`` program.

        (gosup's own NOTIFY_SOCKET, when systemd runs it, never reaches a child:
        spawn.base_environment drops it; this one names gosup's socket.)"""
        if spec.ready is not None and spec.ready.kind is ProbeKind.NOTIFY:
            return {"NOTIFY_SOCKET": str(self.path)}
        return {}

    # -- what the readiness prober asks ------------------------------------------

    async def wait_ready(self, pid: int) -> None:
        """Return once the process ``pid`` (gosup's child) has sent READY=1 (at
        once when it did already); never, when it is not gosup's child."""
        proc = _child(pid)
        if proc is not None and self._said.get(proc, {}).get("READY") == "1":
            return
        key = proc or (pid, -1)  # gone or not ours: nothing can end this wait
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        try:
            await fut
        finally:
            waiters = self._waiters.get(key, [])
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._waiters.pop(key, None)

    def status_of(self, pid: int) -> str | None:
        """The last ``STATUS=`` that the process ``pid`` sent, if any."""
        proc = _child(pid)
        return self._said.get(proc, {}).get("STATUS") if proc is not None else None

    # -- reading ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(BATCH):
            try:
                data, ancdata, flags, _ = sock.recvmsg(MAX_DATAGRAM + 1, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.error("notify socket: {}", exc)
                return
            pid = _sender(ancdata)  # and closes any fds that came along
            if flags & socket.MSG_CTRUNC:
                self._ignore("truncated ancillary data", pid)
            elif len(data) > MAX_DATAGRAM or flags & socket.MSG_TRUNC:
                self._ignore(f"larger than {MAX_DATAGRAM} bytes", pid)
            elif pid is None:
                self._ignore("no credentials", pid)
            elif (fields := _parse(data)) is None:
                self._ignore("not KEY=VALUE lines", pid)
            elif (proc := _child(pid)) is None:
                self._ignore("not the main process of a program", pid)
            else:
                self._accept(proc, fields)

    def _accept(self, proc: Process, fields: dict[str, str]) -> None:
        said = self._said.pop(proc, {})
        self._said[proc] = said  # the newest last; the oldest go first
        if "STATUS" in fields:
            said["STATUS"] = fields["STATUS"][:STATUS_MAX]
        if fields.get("READY") == "1":
            said["READY"] = "1"
            logger.debug("notify: READY=1 from pid {}", proc[0])
            for fut in self._waiters.get(proc, []):
                if not fut.done():
                    fut.set_result(None)
        while len(self._said) > REMEMBERED:
            self._said.popitem(last=False)

    def _ignore(self, why: str, pid: int | None) -> None:
        self.ignored[why] += 1
        now = self._clock()
        last = self._warned_at.get(why)
        if last is None or now - last >= WARN_EVERY:  # a flood is counted, not logged
            self._warned_at[why] = now
            logger.warning(
                "notify: ignored a datagram from pid {} ({}); {} of this kind so far",
                pid if pid is not None else "?",
                why,
                self.ignored[why],
            )


def _sender(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's pid from SCM_CREDENTIALS; fds passed (SCM_RIGHTS) are closed."""
    pid = None
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid = _UCRED.unpack_from(data)[0]
        elif kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
    return pid if pid else None


def _parse(data: bytes) -> dict[str, str] | None:
    """``KEY=VALUE`` lines -> dict; None when it is anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum() or not key.isupper():
            return None
        fields[key] = value
    return fields or None


def _child(pid: int) -> Process | None:
    """(pid, start time) when ``pid`` is a direct child of gosup (a program's
    main process: spawn execs it in place, so its pid is the one gosup
    started), else None. One read of /proc/PID/stat; procfs does not block."""
    fields = spawn.proc_stat(pid)
    if fields is None or fields[1] != str(os.getpid()).encode():
        return None
    return pid, int(fields[19])
