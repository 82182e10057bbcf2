"""The control socket: how ``gosup status``, ``restart``, ``reload`` ... reach
a running gosup (the protocol, for users too: docs/control.md).

Protocol: a Unix stream socket ``<state_dir>/gosup.sock`` (0600, in a 0700
directory). One request per line, a JSON object with ``cmd``; one reply line
per request, in order, on a connection that stays open for more::

    {"cmd": "status"}                      -> {"ok": true, "data": {"programs": [...], ...}}
    {"cmd": "restart", "names": ["api"]}   -> {"ok": false, "error": "...", "data": {...}}

Failed replies carry ``error`` and may carry ``data`` (per-program results, a
reload's ``errors``). A request line over 1 MiB, or one cut off by the end
of the connection, is answered with an error and the connection is closed.

Commands and their arguments: ``status`` {names}; ``start``, ``stop``,
``restart`` {names | all: true}, run concurrently, ``{"results": [{"name",
"ok", "message" | "error"}]}``, ok only when all succeeded; ``signal``
{signal, names | all} (all: the programs that have a process); ``reload``
-> {added, removed, changed}; ``history`` {n, program} -> {records}
(following is ``gosup history -f``, reading the file); ``shutdown``,
answered at once, the connection closing when gosup exits. Other modules
add commands through ``ControlServer.add_command`` (``dump`` is one).

Program commands become the typed messages the signal handlers use
(``Program.request``), so the program's own task serialises them: a stop
during a stop is answered "already stopping", not raced. Every peer is
checked with SO_PEERCRED: only gosup's own uid and root are served, however
the socket's mode was changed; others get ``permission denied: uid N`` and
are disconnected. One gosup per state_dir: an abstract-namespace socket
named after the state_dir's resolved path (``instance_name``, which a
deleted and re-created directory does not free) and an flock on
``gosup.lock`` (which tells a stale socket from a live one), both held for
gosup's life. At most ``MAX_CONNECTIONS`` are open at once: one idle
for ``IDLE_TIMEOUT`` is closed, and when all are open the longest idle one
makes room for a newcomer (``service/conncap.py``), so idle connections can
never lock ``gosup status`` out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from supervisor import __version__, fileops
from supervisor import config as configmod
from supervisor import history as events
from supervisor.core.program import CommandError, Message, Restart, SendSignal, Start, Stop
from supervisor.core.states import SIGNALLABLE_STATES
from supervisor.protocol import LOCK_NAME, MAX_REQUEST, SOCKET_NAME, RequestError
from supervisor.service.conncap import Connections
from supervisor.service.daemon import StartupError, Supervisor

MAX_REPLY = 1 << 20  # what the history command keeps its reply under
# Connections (service/conncap.py): at most this many open; one that waits
# longer than IDLE_TIMEOUT for its next request is closed; a reply the client
# does not take within SEND_TIMEOUT ends the connection.
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 60.0
SEND_TIMEOUT = 10.0
MIN_RECORD = 40  # bytes: no history record is shorter, so a reply holds fewer than
MAX_HISTORY = MAX_REPLY // MIN_RECORD  # this many records (more are never read)
# Figures every status entry carries (null until a sampler fills them in), so
# `status --json` has the same shape whether resource sampling is on or not.
STATUS_FIGURES = ("rss_bytes", "goroutines")


class ControlError(StartupError):
    """The control socket cannot be set up; ``gosup run`` exits 1 with this message."""


class AlreadyRunning(ControlError):
    """Another gosup owns this state_dir."""


# -- requests and the handler table ---------------------------------------------


_JSON_TYPES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


@dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """``args[key]`` checked against ``kind``; ``default`` when absent or null."""
        value = self.args.get(key)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int to isinstance(), but true is not a count.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(_JSON_TYPES.get(k, k.__name__) for k in kinds)
            raise RequestError(f"{self.cmd}: {key!r} must be {expected}")
        return value


Handler = Callable[[Supervisor, Request], Awaitable[Any]]
# The commands this module serves; another part adds its own through
# ControlServer.add_command (the composition root, service/app.py, does it).
BUILTIN: dict[str, Handler] = {}


def _builtin(name: str) -> Callable[[Handler], Handler]:
    """Decorator: one of this module's own commands.

    A handler returns the reply's ``data`` (anything JSON can encode) or
    raises RequestError; it runs on the supervisor's loop.
    """

    def add(handler: Handler) -> Handler:
        BUILTIN[name] = handler
        return handler

    return add


def parse_request(line: bytes, known: Collection[str] = BUILTIN.keys()) -> Request:
    """One request line -> Request; RequestError naming what is wrong with it."""
    if not line.strip():
        raise RequestError('invalid request: empty line (send {"cmd": "status"} and the like)')
    try:
        obj = json.loads(line)
    except UnicodeDecodeError:
        raise RequestError("invalid request: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"invalid request: not JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an over-long number, too deep a nesting
        raise RequestError(f"invalid request: unreadable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise RequestError('invalid request: must be a JSON object like {"cmd": "status"}')
    cmd = obj.pop("cmd", None)
    if not isinstance(cmd, str):
        raise RequestError('invalid request: "cmd" is missing or not a string')
    if cmd not in known:
        raise RequestError(f"unknown command {cmd!r} (known: {', '.join(sorted(known))})")
    return Request(cmd, obj)


def select(sup: Supervisor, req: Request, *, empty_ok: bool = False) -> list[str]:
    """The program names a request is about: "names" (or "name"), or "all"."""
    if req.get("all", bool, False):
        return list(sup.programs)
    single = req.get("name", str)
    names = [single] if single is not None else req.get("names", list, [])
    if not all(isinstance(n, str) for n in names):
        raise RequestError(f"{req.cmd}: 'names' must be a list of program names")
    if not names and not empty_ok:
        raise RequestError(f'{req.cmd}: name at least one program, or send "all": true')
    unknown = [n for n in names if n not in sup.programs]
    if unknown:
        known = ", ".join(sup.programs) or "none"
        raise RequestError(f"unknown program {unknown[0]!r} (programs: {known})")
    return list(dict.fromkeys(names))  # each program once, in the order given


def _refuse_while_stopping(sup: Supervisor, cmd: str) -> None:
    # Starting anything now would race the shutdown's stop of every program.
    if sup.shutting_down:
        raise RequestError(f"{cmd}: gosup is shutting down")


async def _each(sup: Supervisor, names: list[str], make: Callable[[], Message]) -> Any:
    """Send a fresh message to each program concurrently; per-program results."""

    async def one(name: str) -> dict[str, Any]:
        # Look up and post in one step: a reload cannot remove the program between.
        program = sup.programs.get(name)
        if program is None:
            return {"name": name, "ok": False, "error": f"{name} was removed by a reload"}
        try:
            message = await program.request(make())
        except CommandError as exc:
            return {"name": name, "ok": False, "error": str(exc)}
        return {"name": name, "ok": True, "message": message}

    results = await asyncio.gather(*(one(n) for n in names))
    failed = [r["error"] for r in results if not r["ok"]]
    if failed:
        raise RequestError("; ".join(failed), {"results": results})
    return {"results": results}


# -- the commands ------------------------------------------------------------------


@_builtin("status")
async def handle_status(sup: Supervisor, req: Request) -> Any:
    names = select(sup, req, empty_ok=True) or list(sup.programs)
    programs = [sup.programs[n].status() for n in names]
    for entry in programs:
        for key in STATUS_FIGURES:
            entry.setdefault(key, None)
    config = sup.config
    return {
        "programs": programs,
        "supervisor": {
            "pid": os.getpid(),
            "version": __version__,
            "config": str(config.path),
            "config_sha256": config.sha256,
            "state_dir": str(config.supervisor.state_dir),
            "shutting_down": sup.shutting_down,
        },
    }


def _program_command(
    name: str, message: Callable[[], Message], refused_while_stopping: bool
) -> None:
    """``start``, ``stop``, ``restart``: one typed message to each named program."""

    async def handle(sup: Supervisor, req: Request) -> Any:
        if refused_while_stopping:
            _refuse_while_stopping(sup, req.cmd)
        return await _each(sup, select(sup, req), message)

    BUILTIN[name] = handle


_program_command("start", lambda: Start(reason="operator"), refused_while_stopping=True)
_program_command("stop", lambda: Stop(reason="operator"), refused_while_stopping=False)
_program_command("restart", lambda: Restart(reason="operator"), refused_while_stopping=True)


@_builtin("signal")
async def handle_signal(sup: Supervisor, req: Request) -> Any:
    raw = req.get("signal", (str, int))
    if raw is None:
        raise RequestError('signal: "signal" is missing (e.g. "HUP", "SIGUSR1")')
    try:
        signum = configmod.parse_signal(raw)
    except ValueError as exc:
        raise RequestError(f"signal: {exc}") from None
    names = select(sup, req)
    if req.get("all", bool, False):  # "all" means every program that has a process
        names = [n for n in names if sup.programs[n].state in SIGNALLABLE_STATES]
    return await _each(sup, names, lambda: SendSignal(signum=signum, reason="operator"))


@_builtin("reload")
async def handle_reload(sup: Supervisor, req: Request) -> Any:
    _refuse_while_stopping(sup, req.cmd)
    try:
        return await sup.reload()
    except configmod.ConfigError as exc:
        logger.error("reload refused, nothing changed:\n{}", exc)
        raise RequestError(
            f"reload refused, nothing changed:\n{exc}", {"errors": exc.errors}
        ) from None


@_builtin("shutdown")
async def handle_shutdown(sup: Supervisor, req: Request) -> Any:
    logger.info("shutdown requested over the control socket")
    sup.shutdown()
    return "shutting down"


# The history command reads files, which can be slow (a cold cache, a large
# scan): never on the loop, and never in the default executor, where a burst
# of history requests would make a config apply wait. One thread of its own:
# requests queue there, each bounded by SCAN_LIMIT bytes of reading.
_HISTORY_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gosup-history")


def _read_history(path: Path, n: int, program: str | None) -> tuple[list[Any], bool]:
    with events.Last(path, n, program, scan_limit=events.SCAN_LIMIT) as last:
        return list(last), last.complete


@_builtin("history")
async def handle_history(sup: Supervisor, req: Request) -> Any:
    n = req.get("n", int, 20)
    if n < 1:
        raise RequestError("history: 'n' must be at least 1")
    if req.get("follow", bool, False):
        raise RequestError("history: follow is not served here; run `gosup history -f`")
    program = req.get("program", str)
    wanted = min(n, MAX_HISTORY)
    loop = asyncio.get_running_loop()
    records, complete = await loop.run_in_executor(
        _HISTORY_POOL, _read_history, sup.history.path, wanted, program
    )
    # Keep the reply one sane line: the newest records win.
    size, kept = 0, 0
    for rec in reversed(records):
        size += len(json.dumps(rec, ensure_ascii=False)) + 2
        if size > MAX_REPLY:
            break
        kept += 1
    truncated = kept < len(records) or (n > wanted and len(records) == wanted) or not complete
    return {"records": records[len(records) - kept :], "truncated": truncated}


# -- peers ---------------------------------------------------------------------------


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def peer_allowed(uid: int) -> bool:
    """gosup's own uid may control it, and so may root (who could anyway)."""
    return uid in (os.geteuid(), 0)


def _encode(reply: dict[str, Any]) -> bytes:
    text = json.dumps(reply, separators=(",", ":"), ensure_ascii=False, default=str)
    return text.encode() + b"\n"


def _error(message: str, data: Any = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "error": message}
    if data is not None:
        reply["data"] = data
    return reply


# -- the server -----------------------------------------------------------------------


class ControlServer:
    """The supervisor-wide service behind ``<state_dir>/gosup.sock``."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        state_dir = sup.config.supervisor.state_dir
        self.path = state_dir / SOCKET_NAME
        self.lock_path = state_dir / LOCK_NAME
        self._lock_fd: int | None = None
        self._name_sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None
        self._conns: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self.connections = Connections("control socket", MAX_CONNECTIONS, IDLE_TIMEOUT)
        self.handlers: dict[str, Handler] = dict(BUILTIN)

    def add_command(self, name: str, handler: Handler) -> None:
        """Serve ``name`` with ``handler`` (a part of the daemon that owns a command)."""
        if name in self.handlers:
            raise ValueError(f"control command {name!r} is already served")
        self.handlers[name] = handler

    async def start(self) -> None:
        self._claim()
        try:
            sock = bind_socket(self.path)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            self._release()
            raise
        logger.info("control socket {}", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._conns.items()):
            writer.close()
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        self.connections.close_all()
        if self._server is not None:
            await self._server.wait_closed()
        self._unlink_socket()
        self._release()

    # -- one gosup per state_dir --------------------------------------------------

    def _claim(self) -> None:
        """Take the state_dir's two locks, then clear a socket a dead gosup left.

        The instance name (an abstract socket named after the resolved
        state_dir path) holds even when the directory is deleted and made
        again, which a lock on a file in it cannot; the flock on
        ``gosup.lock`` holds where the name cannot be seen (another network
        namespace) and cannot be squatted by another user.
        """
        state_dir = self.path.parent
        self._name_sock = claim_instance_name(state_dir)
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            self._release()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            self._release()
            raise AlreadyRunning(
                f"another gosup (pid {owner}) is already running with state_dir "
                f"{state_dir} (it answers on {self.path}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        if self._name_sock is not None:
            # Answer (and hang up on) whoever asks who holds the name, so that
            # its queue never fills and the next gosup can always tell.
            name_sock = self._name_sock
            asyncio.get_running_loop().add_reader(name_sock, _hang_up_all, name_sock)
        try:
            remove_stale_socket(self.path)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._name_sock is not None:
            with contextlib.suppress(RuntimeError):  # no loop: nothing was added
                asyncio.get_running_loop().remove_reader(self._name_sock)
            self._name_sock.close()
            self._name_sock = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _unlink_socket(self) -> None:
        # Only our own socket: never one a later gosup bound at the same path.
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)

    # -- connections ----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if not self.connections.admit(writer.transport.abort):
            await self._refuse(writer)
            return
        self._conns[task] = writer
        try:
            uid = peer_uid(writer.get_extra_info("socket"))
            keep_open = peer_allowed(uid)
            if not keep_open:
                logger.warning("control: refused a connection from uid {}", uid)
                await self._send(writer, _error(f"permission denied: uid {uid}"))
            while keep_open:
                reply, keep_open = await self._next_reply(reader)
                if reply is not None:
                    await self._send(writer, reply)
            await _hang_up(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass  # the client went away or idled, or gosup is closing: nobody to answer
        finally:
            self.connections.leave()
            self._conns.pop(task, None)
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Every open connection is busy: say so and hang up (never waits on the client)."""
        busy = f"too many connections: {len(self.connections)} requests are being served; retry"
        with contextlib.suppress(OSError, RuntimeError):
            writer.write(_encode(_error(busy)))  # a few bytes: the socket buffer takes them
        writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(_encode(reply))
        async with asyncio.timeout(SEND_TIMEOUT):  # a client that does not read ends here
            await writer.drain()

    async def _next_reply(self, reader: asyncio.StreamReader) -> tuple[dict[str, Any] | None, bool]:
        """Read one request and serve it: (reply or None, keep the connection open)."""
        try:
            async with self.connections.waiting():
                line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial.strip():
                return None, False  # a clean end of the conversation
            return _error("truncated request: the connection ended before the newline"), False
        except asyncio.LimitOverrunError:
            return _error(f"request too large: at most {MAX_REQUEST} bytes per line"), False
        except TimeoutError:
            return None, False  # idle too long: hang up, the client may connect again
        self.connections.busy()
        return await self.dispatch(line), True

    async def dispatch(self, line: bytes) -> dict[str, Any]:
        """Serve one request line; every failure becomes an error reply."""
        try:
            req = parse_request(line, self.handlers.keys())
            if req.cmd not in ("status", "history"):
                logger.info("control: {} {}", req.cmd, json.dumps(req.args))
            data = await self.handlers[req.cmd](self.sup, req)
        except RequestError as exc:
            return _error(str(exc), exc.data)
        except Exception as exc:  # a bug in a handler must not take the socket down
            logger.opt(exception=exc).error("control: internal error")
            return _error(f"internal error: {exc}")
        return {"ok": True, "data": data}


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """End the conversation so that the client reads our last reply and then
    EOF: closing with its unread request still queued would reset the
    connection instead, and the reply could be lost. Bounded: 1 s, 4 MiB."""
    with contextlib.suppress(OSError, RuntimeError, TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(1.0):
            dropped = 0
            while dropped < 4 * MAX_REQUEST and (chunk := await reader.read(65536)):
                dropped += len(chunk)


def remove_stale_socket(path: Path) -> None:
    """Remove a socket nobody answers on; AlreadyRunning when somebody does."""
    try:
        if not path.is_socket():
            if path.exists():
                raise ControlError(f"{path} exists and is not a socket; remove it")
            return
    except OSError as exc:
        raise ControlError(f"cannot inspect {path}: {exc}") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)  # a full accept queue means somebody is there
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            logger.info("removing the stale control socket {}", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        except (TimeoutError, BlockingIOError):
            pass  # with a timeout the connect is non-blocking: a full queue is EAGAIN
    raise AlreadyRunning(f"another gosup answers on {path}; stop it first")


def instance_name(state_dir: Path) -> bytes:
    """The abstract-namespace socket name that says "a gosup runs for this
    state_dir": tied to the directory's resolved path, not to its inode."""
    digest = fileops.sha256_bytes(os.fsencode(state_dir.resolve()))[:40]
    return b"\0gosup-instance-" + digest.encode()


def claim_instance_name(state_dir: Path) -> socket.socket | None:
    """Bind the state_dir's instance name; AlreadyRunning when a gosup of ours
    (our uid, or root) holds it.

    Abstract names have no permissions, so another user could bind ours
    first to keep gosup from starting: a holder of another uid (or one that
    does not say who it is) is logged and ignored, and the flock in the
    directory still keeps one gosup per state_dir. Returns None then.
    """
    name = instance_name(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(name)
        sock.listen(16)
        sock.setblocking(False)
        return sock
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise ControlError(f"cannot claim the instance name of {state_dir}: {exc}") from None
    holder = _name_holder(name)
    if holder is not None and peer_allowed(holder[1]):
        raise AlreadyRunning(
            f"another gosup (pid {holder[0]}) is already running with state_dir {state_dir} "
            "(even if the directory was deleted and made again since); stop it first"
        )
    who = f"pid {holder[0]} of uid {holder[1]}" if holder else "a process that does not answer"
    logger.warning(
        "the instance name of {} is held by {}, not by a gosup of ours: ignored "
        "(the lock in the directory still keeps one gosup per state_dir)",
        state_dir,
        who,
    )
    return None


def _name_holder(name: bytes) -> tuple[int, int] | None:
    """(pid, uid) of the process listening on the abstract socket ``name``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


def _hang_up_all(sock: socket.socket) -> None:
    """Accept and close every pending connection on the instance name."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # BlockingIOError: none left
            return
        conn.close()


def bind_socket(path: Path) -> socket.socket:
    """A listening-ready Unix socket at ``path``, mode 0600 from the start."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the socket file takes the socket inode's mode at bind():
        # set it first so the file is never, even briefly, open to others.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot create the control socket {path}: {exc}") from None
    return sock
