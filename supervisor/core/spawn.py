"""The OS side of a child: exec in a new session, signals to its process group,
privilege drop, and a stop that leaves no descendant behind.

``start_child`` is the one way gosup starts any child: a program, a dev-mode
build, a config validator. Each gets its own session (and so its own process
group, signalled and killed as one), the parent-death signal (if gosup dies,
even by SIGKILL, the kernel kills the child too), and an environment built
from ``base_environment()`` plus gosup's marks, by which the next gosup finds
whatever its descendants left behind (service/orphans.py).

gosup is a child subreaper (``become_subreaper``): a daemon a program
double-forks is re-parented to gosup, not to init, so it stays in gosup's
tree, is found by ``adopted`` and stopped with its program.

Nothing here that can stall runs on the loop: user lookups (NSS may ask
LDAP), the ``setpriv --help`` probe and the binary's hash happen in a
thread (``launch``); only the fork/exec itself runs on the loop thread, which
owns the parent-death signal. A restart that needs none of them (no user to
switch to, a binary whose hash is known for its inode, size and mtime) is
prepared on the loop: the stat calls it makes are the ones the exec makes.

Why not ``asyncio.create_subprocess_exec``: its child watchers either start a
thread per child or are deprecated, and they reap with ``waitpid(-1)`` in some
configurations, which would steal exit statuses we need. We use
``subprocess.Popen`` and learn about the exit through a pidfd registered with
the event loop (Linux >= 5.3), so one loop thread sees every exit at once, and
only ``Popen`` itself ever reaps our children.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import grp
import math
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from supervisor import fileops
from supervisor.config import CAPABILITIES, ProgramSpec
from supervisor.core import cgroup, exechelper

if TYPE_CHECKING:  # imported where used: an idle daemon never loads psutil (issue 18, RSS)
    import psutil

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_libc: ctypes.CDLL | None = None
# Every Popen start_child made: the direct children gosup started itself, as
# opposed to orphans re-parented to it (``adopted``).
_started: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()
_started_lock = threading.Lock()  # read from the threads that sweep leftovers


def _started_pids(running_only: bool) -> set[int]:
    with _started_lock:
        return {p.pid for p in _started if not running_only or p.returncode is None}


class SpawnError(Exception):
    """The child could not be started; the message names the problem."""


class PrivilegeError(SpawnError):
    """The program asks for a user or group gosup has no right to switch to."""


@dataclass(frozen=True)
class Identity:
    """Who the child runs as (None: as gosup itself)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str
    home: str


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """Look up ``user``/``group``; refuse a switch gosup has no right to make."""
    if user is None and group is None:
        return None
    me = pwd.getpwuid(os.getuid())
    try:
        pw = pwd.getpwnam(user) if user is not None else me
    except KeyError:
        raise SpawnError(f"user {user!r} does not exist") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group is not None else pw.pw_gid
    except KeyError:
        raise SpawnError(f"group {group!r} does not exist") from None
    if os.geteuid() != 0 and (pw.pw_uid != os.getuid() or gid != os.getgid()):
        raise PrivilegeError(
            f"cannot run as user {pw.pw_name!r}: gosup is not root (it runs as {me.pw_name!r})"
        )
    groups = tuple(os.getgrouplist(pw.pw_name, gid))
    return Identity(pw.pw_uid, gid, groups, pw.pw_name, pw.pw_dir)


def locate_executable(argv0: str, directory: Path, env: Mapping[str, str]) -> str | None:
    """Where ``argv0`` is, looked up the way a shell would: a name with '/' against
    ``directory`` (whether it exists or not), a bare name on ``env``'s PATH (None
    when it is not there).

    ``env`` is the child's environment (``child_environment``), so the PATH is
    the program's: its ``environment``'s PATH, else gosup's.
    """
    if "/" in argv0:
        return os.path.abspath(directory / argv0)
    return shutil.which(argv0, path=env.get("PATH", os.defpath))


def resolve_executable(argv0: str, directory: Path, env: Mapping[str, str]) -> str:
    """``locate_executable``, insisting on an executable file (SpawnError if not)."""
    path = locate_executable(argv0, directory, env)
    if path is None:
        raise SpawnError(f"binary {argv0!r} not found on PATH")
    try:  # one lookup of the path for both questions: every start asks them
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        raise SpawnError(f"binary {argv0!r} not found (looked for {path})") from None
    if is_dir:
        raise SpawnError(f"binary {argv0!r} is a directory ({path})")
    if not os.access(path, os.X_OK):
        raise SpawnError(f"binary {argv0!r} is not executable ({path})")
    return path


_sha_cache: dict[tuple[str, int, int, int], str] = {}


def _sha_key(path: str) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


def binary_sha256(path: str) -> str:
    """SHA-256 of the binary, cached by (path, inode, size, mtime): restarts stay fast."""
    key = _sha_key(path)
    digest = _sha_cache.get(key)
    if digest is None:
        digest = _sha_cache[key] = fileops.sha256_file(path)
    return digest


# The marks every child carries (and so its descendants): found again by them
# when they escape their process group (service/orphans.py).
STATE_DIR_VAR = "GOSUP_STATE_DIR"
PROGRAM_VAR = "GOSUP_PROGRAM"
# gosup's own business, never a child's: systemd's notify socket and watchdog
# (like sd_notify's unset_environment), sockets systemd passed to gosup, and
# the marks of a gosup that runs us.
PRIVATE_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    STATE_DIR_VAR,
    PROGRAM_VAR,
)


def marks(state_dir: Path, program: str) -> dict[str, str]:
    """The marks of a child of ``program`` under the gosup of ``state_dir``."""
    return {STATE_DIR_VAR: _resolved(state_dir), PROGRAM_VAR: program}


@functools.lru_cache(maxsize=16)
def _resolved(state_dir: Path) -> str:
    # Once per state_dir, not at every start: resolving stats each component of the path.
    return str(state_dir.resolve())


# gosup's environment decoded, with the raw bytes it was decoded from.
_base_env: tuple[dict[bytes, bytes], dict[str, str]] | None = None


def base_environment() -> dict[str, str]:
    """gosup's environment as every child (program, build, validator) starts from.

    Decoded again only when gosup's environment changed (CPython's
    ``os.environ._data``, its raw bytes, compared in C): decoding it every
    time was a twentieth of a crash-loop start's time on the loop."""
    global _base_env
    raw: dict[bytes, bytes] | None = getattr(os.environ, "_data", None)
    cached = _base_env
    if raw is not None and cached is not None and cached[0] == raw:
        return dict(cached[1])
    env = dict(os.environ)
    for var in PRIVATE_ENV:
        env.pop(var, None)
    if raw is not None:
        _base_env = (dict(raw), dict(env))
    return env


def child_environment(
    spec: ProgramSpec, identity: Identity | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """gosup's environment, then the program's, then HOME/USER of a dropped identity,
    then ``extra`` (gosup's marks, the Go runtime settings) where the program set nothing."""
    env = base_environment()
    env.update(spec.environment)
    if identity is not None:
        env.update(HOME=identity.home, USER=identity.name, LOGNAME=identity.name)
    for key, value in (extra or {}).items():
        env.setdefault(key, value)
    return env


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv, if it knows --pdeathsig (2.33 and later)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in usage.stdout else None


def _death_signal_argv(
    argv: list[str], plain: bool = False
) -> tuple[list[str], Callable[[], None] | None]:
    """The argv (and preexec function) that give the child a parent-death signal:
    if gosup dies, even by SIGKILL, the kernel kills the child too.

    ``plain``: the child keeps gosup's user and gets no capabilities, so
    gosup's own static helper can do it (``exechelper``: no more than the
    exec itself, where setpriv's dynamic linking costs about 1 ms a start).
    Otherwise, or where that helper is not available, as follows.

    ``setpriv --pdeathsig KILL -- prog`` sets it and execs the program, and keeps
    Popen on its vfork path. A ``preexec_fn`` does the same from Python, but it
    forces a full fork plus Python's after-fork work in the child: measured
    5.1 ms per spawn against 2.5 ms with setpriv (1.7 ms without either).
    Measured again for issue 18 at gosup's RSS (43 MiB, load 10, Popen -> a Go
    program's start stamp, p50 of 40): without either 4.3 ms, setpriv 6.8,
    ``preexec_fn`` 12.2 (Popen itself blocks the loop 9 ms: the fork copies
    the page tables), a static C helper doing only prctl + exec 6.3. On the
    CPU of later runs (a 40 MiB process, p50 of 40) setpriv cost 0.96 ms a
    start over none, a static helper linked with glibc 0.42, one of bare
    system calls (``exechelper``) 0.03: there the cost is setpriv's linking
    and libc's start, not the second exec. Nothing in Popen sets the signal
    between fork and exec without one of these.
    """
    # (The helper execs argv[0] as given, without a PATH search.)
    if plain and os.path.isabs(argv[0]) and (helper := exechelper.path()) is not None:
        return [helper, *argv], None
    setpriv = _setpriv()
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], None
    return argv, _set_parent_death_signal


def _libc_handle() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's ``malloc_trim``;
    nothing where there is none): what start-up allocated and freed, about
    1.3 MiB of an idle gosup's RSS with 50 programs (issue 18)."""
    with contextlib.suppress(AttributeError, OSError):
        _libc_handle().malloc_trim(0)


def _set_parent_death_signal() -> None:
    # Runs in the child between fork and exec (the fallback without setpriv).
    _libc_handle().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def become_subreaper() -> bool:
    """Make gosup a child subreaper (``PR_SET_CHILD_SUBREAPER``): what a program
    double-forks (``( setsid daemon & )``) is re-parented to gosup, not to init,
    and is stopped with its program. False when the kernel said no."""
    return int(_libc_handle().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def own_children() -> set[int]:
    """Pids of gosup's children now, from ``/proc/self/task/*/children`` (no
    scan of the whole /proc); psutil's scan where the kernel lacks that file.
    Inside ``one_look`` (on that thread), the first answer is reused."""
    look: set[int] | None = getattr(_look, "children", None)
    if look is not None:
        return look
    found = _own_children_now()
    if getattr(_look, "depth", 0):
        _look.children = found
    return found


def _own_children_now() -> set[int]:
    if _children_files():
        return set(_child_pids("self"))
    import psutil

    with contextlib.suppress(psutil.Error):
        return {p.pid for p in psutil.Process().children()}
    return set()


_look = threading.local()


@contextlib.contextmanager
def one_look() -> Iterator[None]:
    """gosup's children read once for the whole block (on this thread): a
    crash's sweep asks for them twice (the run's adopted orphans, then the
    marked escapees among them), and each read is a file per gosup thread."""
    _look.depth = getattr(_look, "depth", 0) + 1
    try:
        yield
    finally:
        _look.depth -= 1
        if not _look.depth:
            _look.children = None


def strays() -> bool:
    """Whether gosup has a child it did not start: an orphan re-parented to it
    (as the subreaper or PID 1), or one whose start another thread has not
    registered yet. Called on the loop (main) thread after a crash, to skip
    the sweep when nothing can be left (``Program._sweep_crashed``).

    One file: the main thread's ``/proc/self/task/PID/children``. The kernel
    gives an orphan to the first live thread of its reaper, the main thread
    while it runs (kernel/exit.c, ``find_new_reaper``/``find_alive_thread``,
    Linux >= 3.19), and a child the loop thread forked itself is registered
    before the loop goes on. True where the kernel lacks the file (unknown)."""
    if not _children_files():
        return True
    try:
        listed = _read_proc(f"/proc/self/task/{os.getpid()}/children").split()
    except OSError:
        return True
    if not listed:
        return False
    return not {int(pid) for pid in listed} <= _started_pids(running_only=True)


def adopted(program: str) -> list[psutil.Process]:
    """Orphans of ``program``'s runs re-parented to gosup (the subreaper), found
    by their ``GOSUP_PROGRAM`` mark, with their descendants. Children gosup
    started itself (programs, builds, validators) are not orphans.

    A child being started meanwhile (in another thread, not yet among those
    gosup started) is a candidate too: each candidate's environment is read
    raw and only a match becomes a ``psutil.Process`` (under a crash loop,
    most candidates are such starts of other programs)."""
    import psutil

    mine = _started_pids(running_only=True)
    found: list[psutil.Process] = []
    mark = f"{PROGRAM_VAR}={program}".encode()
    for pid in own_children() - mine:
        if _environ_has(pid, mark):
            with contextlib.suppress(psutil.Error):
                found += process_tree(pid)
    return found


def _environ_has(pid: int, entry: bytes) -> bool:
    """Whether process ``pid``'s environment holds ``entry`` (``NAME=value``)
    as a whole variable; False when it is gone or unreadable."""
    try:
        block = _read_proc(f"/proc/{pid}/environ")
    except OSError:
        return False
    return block.startswith(entry + b"\0") or b"\0" + entry + b"\0" in block


def _read_proc(path: str) -> bytes:
    """A /proc file whole, read by fd (no file object: this runs per crash)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def start_ticks() -> int:
    """Now, on the clock the kernel dates process starts by: clock ticks since
    boot (``starttime`` in /proc/PID/stat). A process started from now on has
    at least this; one started in an earlier tick has less."""
    return math.floor(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def proc_stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after ``pid (comm)``: [0] the state
    letter, [1] the ppid, [19] the start time in clock ticks since boot. None
    when the process is gone. One read; procfs does not block."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # comm may hold spaces and ")"
    return fields if len(fields) >= 20 else None


def _started_at(pid: int) -> int | None:
    """Process ``pid``'s start, in clock ticks since boot (None: it is gone)."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields is not None else None


def started_before(procs: list[psutil.Process], ticks: int) -> list[psutil.Process]:
    """Those of ``procs`` that started in a clock tick before ``ticks``
    (``start_ticks``): one started in the same tick is not among them."""
    out = []
    for proc in procs:
        started = _started_at(proc.pid)
        if started is not None and started < ticks:
            out.append(proc)
    return out


def reap(procs: list[psutil.Process]) -> None:
    """Reap those of ``procs`` that are gosup's zombie children and were not
    started by gosup (adopted orphans, which no Popen waits for)."""
    import psutil

    me = os.getpid()
    mine = _started_pids(running_only=False)
    for proc in procs:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.pid in mine or proc.ppid() != me or proc.status() != psutil.STATUS_ZOMBIE:
                continue
            os.waitpid(proc.pid, os.WNOHANG)


class Child:
    """One running child process and the pipes of its output."""

    def __init__(self, popen: subprocess.Popen[bytes], executable: str) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.executable = executable
        self.exited = asyncio.get_running_loop().create_future()
        self._pidfd: int | None = None
        self._exit_lag = 0.0  # how long before gosup noticed it the child had exited
        self._noticed: float | None = None  # time.monotonic() when gosup noticed
        self._dead_by: float | None = None  # found dead after a stall that began then
        self._on_exit: list[Callable[[int], None]] = []  # told in the pidfd callback itself
        # The kernel's OOM-kill count just before the fork, where the spawn
        # thread read it (None: read it now; see Program._spawn).
        self.oom_kills_before: int | None = None
        _PULSE.ensure()
        _PULSE.children.add(self)
        self._watch_exit()

    def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:  # pragma: no cover - kernels before 5.3
            self._poll_exit_later(loop)
            return
        loop.add_reader(self._pidfd, self._on_exit_readable)

    def _poll_exit_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.popen.poll() is None:
            loop.call_later(0.05, self._poll_exit_later, loop)
        elif not self.exited.done():
            self._set_exited(self.popen.returncode)

    def _on_exit_readable(self) -> None:
        # gosup may have been stopped (SIGSTOP) or its loop stalled when the
        # child exited: the exit then happened in the gap (see _LoopPulse).
        now = time.monotonic()
        lag = now - self._dead_by if self._dead_by is not None else _PULSE.gap()
        code = self.popen.poll()
        if code is None:
            return
        assert self._pidfd is not None
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        self._exit_lag, self._noticed = lag, time.monotonic()
        if not self.exited.done():
            self._set_exited(code)

    def _set_exited(self, code: int) -> None:
        self.exited.set_result(code)
        callbacks, self._on_exit = self._on_exit, []
        for fn in callbacks:
            fn(code)

    def on_exit(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(code)`` once the child has exited: from the pidfd callback
        itself, with no loop turn in between (a done callback of ``exited``
        would wait for the next one); on the next turn when the exit is known
        already. ``fn`` must not raise."""
        if self.exited.done():
            asyncio.get_running_loop().call_soon(fn, self.exited.result())
        else:
            self._on_exit.append(fn)

    def alive(self) -> bool:
        """Whether the child still runs now (not a zombie), without reaping it:
        its exit may be known to the kernel before gosup's loop has heard of it."""
        if self.exited.done():
            return False
        if self._pidfd is None:
            return self.popen.poll() is None
        try:
            return os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:
            return False

    def ended_ago(self) -> float:
        """Seconds since the child exited (0 while it runs, or when unknown): its
        run's end, even when gosup itself was stopped when it happened."""
        if self._noticed is None:
            return 0.0
        return time.monotonic() - self._noticed + self._exit_lag

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the child's process group; False if it is gone."""
        return self._send(os.killpg, sig)

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the main process only; False if it is gone."""
        return self._send(os.kill, sig)

    def _send(self, kill: Callable[[int, int], None], sig: int) -> bool:
        if self.exited.done():
            return False
        try:
            kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def signal_escaped(self, procs: list[psutil.Process], sig: int) -> None:
        """Send ``sig`` to the processes of a snapshot that left the child's group."""
        import psutil

        for proc in procs:
            if _pgid(proc.pid) not in (self.pid, None):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)

    def group_empty(self) -> bool:
        """Whether nothing is left in the child's process group (one ``kill(0)``,
        after the leader was reaped); False when something is, even a process
        gosup may not signal."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def group_members(self) -> list[psutil.Process]:
        """Processes still in the child's process group (after the leader is gone)."""
        import psutil

        try:
            os.killpg(self.pid, 0)  # cheap test first: does anyone of the group remain?
        except OSError:
            return []
        members = []
        for proc in psutil.process_iter():
            if _pgid(proc.pid) == self.pid:
                members.append(proc)
        return members

    @property
    def stdout(self) -> IO[bytes]:
        assert self.popen.stdout is not None
        return self.popen.stdout

    @property
    def stderr(self) -> IO[bytes]:
        assert self.popen.stderr is not None
        return self.popen.stderr

    def tree(self) -> list[psutil.Process]:
        """The child and every descendant now (taken before signalling: descendants
        that left the group are only found through their parents)."""
        return process_tree(self.pid)


def process_tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants now, parents first; [] when it is gone.

    Walked down through ``/proc/PID/task/*/children`` (``children``: a few
    reads per process of the tree) instead of psutil's
    ``children(recursive=True)``, which reads the stat file of every process
    on the host (at 1,000 programs, 40-110 ms per stop: issue 18). A process
    that ends meanwhile is left out."""
    import psutil

    try:
        found = [psutil.Process(pid)]
    except psutil.Error:
        return []
    at = 0
    while at < len(found):
        found += children(found[at])
        at += 1
    return found


def children(proc: psutil.Process) -> list[psutil.Process]:
    """``proc``'s children now, from ``/proc/PID/task/*/children``; psutil's
    scan of all of /proc where the kernel lacks those files."""
    import psutil

    if not _children_files():
        with contextlib.suppress(psutil.Error):
            return proc.children()
        return []
    out = []
    for pid in _child_pids(str(proc.pid)):
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid))
    return out


def _child_pids(pid: str) -> list[int]:
    """The children of process ``pid`` (a number, or "self"), each thread's
    ``/proc/PID/task/TID/children`` (the kernel lists a child under the thread
    that forked it); [] for a process, or the part of a thread, that ended."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                pids += map(int, _read_proc(f"/proc/{pid}/task/{task}/children").split())
    return pids


@functools.cache
def _children_files() -> bool:
    """Whether this kernel lists children in /proc (CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


async def launch(
    spec: ProgramSpec,
    extra_env: Mapping[str, str],
    listeners: Sequence[socket.socket] = (),
    fd_name: str = "",
    *,
    at_once: bool = False,
) -> tuple[Child, str]:
    """Resolve everything about the start, then spawn: (child, binary sha256).

    ``listeners`` become the child's fds 3.. (systemd's protocol, named
    ``fd_name`` in LISTEN_FDNAMES). Every problem (unknown user, missing
    directory or binary) is a SpawnError raised before anything runs. The
    resolving (user lookups, the binary's hash, the setpriv probe) runs in a
    thread; the fork/exec on the loop's. A restart of a program that switches
    no user, whose binary is unchanged since its hash was taken, needs none of
    that: it is prepared on the loop (``_prepare_known``), as fast as a start
    can be.

    The fork/exec itself: on the loop's thread when ``at_once`` (a crash
    after a healthy run restarted at once, where every hand-over counts),
    else in gosup's spawn thread (``_spawn_thread``). Popen with vfork
    suspends the thread that calls it until the child has exec'd, which
    under load (200 crash-looping programs on 2 cores) took 4 ms at p50
    and 80 ms at worst per start, the whole loop standing still; the
    spawn thread waits instead, without the GIL.
    """
    prepared = _prepare_known(spec, extra_env)
    if prepared is None:
        prepared = await asyncio.to_thread(_prepare, spec, extra_env)
    executable, env, identity, digest = prepared
    if at_once:
        return spawn(spec, executable, env, identity, listeners, fd_name), digest
    start = functools.partial(_counted_start, spec, executable, env, identity, listeners, fd_name)
    future = asyncio.get_running_loop().run_in_executor(_spawn_thread(), start)
    try:
        popen, oom_kills = await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(_abandoned)  # started all the same: end it, reap it
        raise
    child = Child(popen, executable)
    child.oom_kills_before = oom_kills
    return child, digest


def _counted_start(*args: Any) -> tuple[subprocess.Popen[bytes], int]:
    """``_start`` in the spawn thread, with the OOM-kill count just before it
    (the run's baseline: one read of a kernel file the loop need not make)."""
    oom_kills = cgroup.oom_kills()
    return _start(*args), oom_kills


@functools.cache
def _spawn_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that forks the children the loop need not wait for.

    It lives as long as gosup (an executor's worker never retires): the
    parent-death signal a child gets belongs to the thread that forked it,
    so a thread that ended would take its children with it."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gosup-spawn")


def _abandoned(future: asyncio.Future[tuple[subprocess.Popen[bytes], int]]) -> None:
    """A start whose caller was cancelled meanwhile (gosup stopping): nobody
    watches that child, so it is killed with its group and reaped."""
    if future.cancelled() or future.exception() is not None:
        return
    popen = future.result()[0]
    with contextlib.suppress(OSError):
        os.killpg(popen.pid, signal.SIGKILL)
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()
    _spawn_thread().submit(popen.wait)


def _prepare_known(
    spec: ProgramSpec, extra_env: Mapping[str, str]
) -> tuple[str, dict[str, str], Identity | None, str] | None:
    """``_prepare`` without a thread, or None when it needs one: a user or group
    to look up (NSS may ask LDAP) or a binary whose hash is not known yet (a
    first start, a new build). What is left are the stat calls the exec makes
    on the loop thread anyway: the directory, the binary's path."""
    if spec.user is not None or spec.group is not None or not spec.directory.is_dir():
        return None
    env = child_environment(spec, None, extra_env)
    executable = resolve_executable(spec.command[0], spec.directory, env)
    digest = _sha_cache.get(_sha_key(executable))
    return None if digest is None else (executable, env, None, digest)


def _prepare(
    spec: ProgramSpec, extra_env: Mapping[str, str]
) -> tuple[str, dict[str, str], Identity | None, str]:
    if not spec.directory.is_dir():
        raise SpawnError(f"directory {str(spec.directory)!r} does not exist")
    identity = resolve_identity(spec.user, spec.group)
    env = child_environment(spec, identity, extra_env)
    executable = resolve_executable(spec.command[0], spec.directory, env)
    _setpriv()  # probed once, here rather than on the loop
    exechelper.path()  # made and checked once (an exec), likewise
    return executable, env, identity, binary_sha256(executable)


def spawn(
    spec: ProgramSpec,
    executable: str,
    env: Mapping[str, str],
    identity: Identity | None,
    listeners: Sequence[socket.socket] = (),
    fd_name: str = "",
) -> Child:
    """Start the program; raise SpawnError naming what is wrong."""
    return Child(_start(spec, executable, env, identity, listeners, fd_name), executable)


def _start(
    spec: ProgramSpec,
    executable: str,
    env: Mapping[str, str],
    identity: Identity | None,
    listeners: Sequence[socket.socket],
    fd_name: str,
) -> subprocess.Popen[bytes]:
    """The fork/exec of ``spawn``, on any thread (``Child`` needs the loop's)."""
    argv = [executable, *spec.command[1:]]
    with _inheritable_copies(listeners) as fds:
        if fds:
            env = {**env, **listen_env(len(fds), fd_name or spec.name)}
        popen = start_child(
            argv,
            spec.directory,
            env,
            identity=identity,
            pass_fds=tuple(fds),
            listen_fds=fds,
            capabilities=spec.capabilities,
            resolved=True,  # by launch, just before
        )
    _widen_pipes(popen)
    return popen


# -- inherited sockets (systemd's socket-activation protocol) ------------------
#
# The child must find the sockets at fds 3, 4, ... and LISTEN_PID must be its
# own pid (go-systemd's activation package and the Go fixture ignore the
# variables otherwise). systemd sets both between fork and exec. Popen can
# neither move an fd to a given number nor put the child's pid in its
# environment, so a wrapper that execs the program (the pid stays the same)
# does it: bash (``exec 3<&17 17<&-``, ``LISTEN_PID=$$``), or where there is
# no bash, gosup's Python with the same few lines (slower to start). dash
# cannot: it only knows single-digit fds. The wrapper runs after setpriv, so
# the parent-death signal holds for the wrapper and, across its exec, for
# the program.

_PY_WRAPPER = """\
import os, sys
n = int(sys.argv[1])
for i, fd in enumerate(sys.argv[2 : 2 + n]):
    os.dup2(int(fd), 3 + i)
    os.close(int(fd))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2 + n], sys.argv[2 + n :])
"""


def listen_env(count: int, name: str) -> dict[str, str]:
    """LISTEN_FDS and LISTEN_FDNAMES for ``count`` sockets (LISTEN_PID: the wrapper)."""
    return {"LISTEN_FDS": str(count), "LISTEN_FDNAMES": ":".join([name] * count)}


@functools.cache
def _bash() -> str | None:
    return shutil.which("bash")


def listen_argv(argv: list[str], fds: Sequence[int]) -> list[str]:
    """``argv`` behind the wrapper that moves ``fds`` to 3.. and sets LISTEN_PID.

    Every fd in ``fds`` must be >= 3 + len(fds), so no move overwrites another."""
    assert all(fd >= 3 + len(fds) for fd in fds)
    bash = _bash()
    if bash is None:
        return [sys.executable, "-I", "-S", "-c", _PY_WRAPPER, str(len(fds)), *map(str, fds), *argv]
    moves = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(fds))
    script = f'exec {moves}; export LISTEN_PID=$$; exec "$@"'
    return [bash, "-c", script, "gosup-listen", *argv]


@contextlib.contextmanager
def _inheritable_copies(listeners: Sequence[socket.socket]) -> Iterator[list[int]]:
    """Close-on-exec copies of the sockets above the fds they will be moved to;
    Popen makes them inheritable in the child only (``pass_fds``)."""
    fds: list[int] = []
    try:
        for sock in listeners:
            fds.append(fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 3 + len(listeners)))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def start_child(
    command: Sequence[str],
    directory: Path,
    env: Mapping[str, str],
    *,
    stderr: int = subprocess.PIPE,
    identity: Identity | None = None,
    pass_fds: tuple[int, ...] = (),
    listen_fds: Sequence[int] = (),
    capabilities: tuple[str, ...] = (),
    resolved: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``command`` the way gosup starts every child; SpawnError if it cannot.

    ``command[0]`` is resolved first (``resolve_executable``, on ``env``'s
    PATH), so that a missing binary is a SpawnError, not an exit code of the
    setpriv wrapper; ``resolved``: the caller did that just before, and
    ``command[0]`` is the path it found (a program's start). The child gets
    its own session, the parent-death signal, stdin from /dev/null, stdout
    as a pipe and ``stderr`` as asked (a pipe, or STDOUT for one stream in
    order), and runs as ``identity`` when gosup is root. ``env`` should come
    from ``child_environment`` (``base_environment`` plus the program's
    variables and gosup's marks). ``listen_fds`` (also in ``pass_fds``)
    become fds 3.. of the program, with LISTEN_PID its pid.

    The parent-death signal belongs to the thread that starts the child: a
    caller in a worker thread must keep that thread until the child is gone
    (``asyncio.to_thread`` callers that wait for the child in the same call do).

    ``capabilities`` (``CAP_NET_BIND_SERVICE`` ...) stay with the child as
    ambient capabilities after the user switch: setpriv switches the user
    then, not Popen (whose switch would drop them).
    """
    executable = command[0] if resolved else resolve_executable(command[0], directory, env)
    drop = identity is not None and os.geteuid() == 0
    argv = [executable, *command[1:]]
    if listen_fds:
        argv = listen_argv(argv, listen_fds)
    # The exec helper needs gosup's user (it is one of gosup's descriptors).
    argv, preexec = _death_signal_argv(argv, plain=not drop and not capabilities)
    if capabilities:
        argv = _with_capabilities(argv, identity if drop else None, capabilities)
        drop = False  # setpriv switches the user itself, keeping the capabilities
    try:
        popen = subprocess.Popen(
            argv,
            bufsize=0,  # the pipes are read by fd (asyncio, os.read): no 4 KiB buffers each
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
            preexec_fn=preexec,
            pass_fds=pass_fds,
            user=identity.uid if drop and identity else None,
            group=identity.gid if drop and identity else None,
            extra_groups=list(identity.groups) if drop and identity else None,
        )
    except OSError as exc:
        raise SpawnError(f"cannot execute {executable}: {exc.strerror or exc}") from exc
    except subprocess.SubprocessError as exc:
        raise SpawnError(f"cannot start {executable}: {exc}") from exc
    with _started_lock:
        _started.add(popen)
    return popen


def _with_capabilities(
    argv: list[str], identity: Identity | None, capabilities: tuple[str, ...]
) -> list[str]:
    """``argv`` (setpriv's, from ``_death_signal_argv``) extended to switch to
    ``identity`` and raise ``capabilities`` as inheritable and ambient."""
    setpriv = _setpriv()
    if setpriv is None or argv[0] != setpriv:
        raise SpawnError("capabilities need util-linux's setpriv (2.33 or later)")
    caps = ",".join("+" + name.removeprefix("CAP_").lower() for name in capabilities)
    switch: list[str] = []
    if identity is not None:
        groups = ",".join(str(g) for g in identity.groups)
        switch = [f"--reuid={identity.uid}", f"--regid={identity.gid}"]
        switch += [f"--groups={groups}"] if groups else ["--clear-groups"]
    return [setpriv, *switch, f"--inh-caps={caps}", f"--ambient-caps={caps}", *argv[1:]]


def capability_errors(capabilities: tuple[str, ...]) -> list[str]:
    """Why gosup could not grant ``capabilities`` (empty: it can). They must be
    in gosup's permitted and bounding sets (root, usually), and setpriv there."""
    if not capabilities:
        return []
    if _setpriv() is None:
        return ["capabilities need util-linux's setpriv (2.33 or later), not found on PATH"]
    permitted, bounding = _own_capability_sets()
    missing = [
        name
        for name in capabilities
        if (number := CAPABILITIES.get(name)) is None
        or not (permitted >> number) & 1
        or not (bounding >> number) & 1
    ]
    if missing:
        return [
            f"cannot grant {', '.join(missing)}: not in gosup's permitted and bounding "
            "capability sets (run gosup as root, or give its unit these capabilities)"
        ]
    return []


def _own_capability_sets() -> tuple[int, int]:
    """gosup's permitted and bounding capability sets, as bit masks."""
    sets = {"CapPrm": 0, "CapBnd": 0}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in sets:
                sets[key] = int(value.strip(), 16)
    return sets["CapPrm"], sets["CapBnd"]


PIPE_SIZE = 1 << 20  # bytes a child may write ahead of us before it blocks


def _widen_pipes(popen: subprocess.Popen[bytes]) -> None:
    """Give the output pipes 1 MiB instead of 64 KiB: a chatty child blocks less
    often, and each read hands us more. Best effort: past the per-user pipe quota
    (non-root, many programs) the kernel says no and the default stays."""
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def kill_tree(procs: list[psutil.Process], sig: int = signal.SIGKILL) -> int:
    """Signal every process of a snapshot that still runs, and its children.

    What is left of a program's tree at a stop or a crash, and leftovers that
    outlived their SIGTERM, all end here.

    ``psutil.Process`` remembers each process's start time, so a pid reused
    since the snapshot is never hit. Returns how many were signalled.
    """
    import psutil

    seen: set[int] = set()
    hit = 0
    pending = list(procs)
    while pending:
        proc = pending.pop()
        if proc.pid in seen:
            continue
        seen.add(proc.pid)
        with contextlib.suppress(psutil.Error):
            if not proc.is_running():
                continue
            pending.extend(children(proc))
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            proc.send_signal(sig)
            hit += 1
    return hit


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of a snapshot that still exist and are not zombies."""
    import psutil

    out = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


async def wait_gone(
    procs: list[psutil.Process],
    timeout: float,
    clock: Callable[[], float],
    cut_short: Callable[[], bool] = lambda: False,
) -> list[psutil.Process]:
    """Wait until none of ``procs`` is alive, or ``timeout``, or ``cut_short()``
    says to stop waiting; return the survivors."""
    deadline = clock() + timeout
    left = alive(procs)
    delay = 0.005
    while left and clock() < deadline and not cut_short():
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
        left = alive(left)
    return left


def signal_by_name(sig: int) -> str:
    """The signal's name; also for numbers the enum lacks (real-time signals)."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        if signal.SIGRTMIN < sig < signal.SIGRTMAX:
            return f"SIGRTMIN+{sig - signal.SIGRTMIN}"
        return f"signal {sig}"


def exit_fields(pid: int, code: int, uptime: float) -> dict[str, Any]:
    """An exit record's own fields: ``code`` as Popen gives it (negative: the
    signal that ended the process, named), and the run's uptime."""
    return {
        "pid": pid,
        "exit_code": code if code >= 0 else None,
        "signal": signal_by_name(-code) if code < 0 else None,
        "uptime_s": round(uptime, 3),
    }


class _LoopPulse:
    """When the loop last ran, to date the exits it did not see happen.

    The kernel keeps no exit time, and a zombie's scheduler clock is per CPU
    (not comparable with ours). So a cheap timer notes that the loop runs. A
    beat that comes more than PULSE later than it was due (gosup was stopped
    with SIGSTOP, or the machine froze it) looks at the children: one that is
    dead by then died during the silence, and its run is dated to the
    silence's start. It was alive then, so its uptime is at least that, and
    never the length of the stop. (The beat may run before the exit's own
    callback: after SIGCONT the first wait can come back empty.)

    The beat only needs to be as fine as the runs it dates: every PULSE while
    the newest child is young (300 ms or a 3 s stop decides backoff and
    start_seconds), then a tenth of its age, at most every SLOWEST seconds
    (an error of seconds in an uptime of minutes). An idle gosup wakes for it
    a dozen times a minute instead of four times a second, and not at all
    without children; a new child makes it fast again.
    """

    PULSE = 0.25  # the finest beat, and how late a beat may be before it is a stall
    SLOWEST = 5.0
    AGE_FRACTION = 0.1  # the beat's interval, as a fraction of the newest child's age

    def __init__(self) -> None:
        self.last = time.monotonic()  # the last beat: the loop ran then
        self.due = self.last  # when the next beat should run
        self.born = self.last  # when the newest child started
        self.children: weakref.WeakSet[Child] = weakref.WeakSet()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def ensure(self) -> None:
        """A child starts: beat on the running loop, every PULSE from now."""
        loop = asyncio.get_running_loop()
        self.born = time.monotonic()
        if self._loop is not loop:
            self._loop, self._handle, self.last = loop, None, self.born
        if self._handle is None or self.due > self.born + self.PULSE:
            self._schedule(loop, self.PULSE)

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self.due = time.monotonic() + delay
        self._handle = loop.call_later(delay, self._beat, loop)

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        if self._loop is not loop or loop.is_closed():
            return
        silent_since, self.last = self.last, time.monotonic()
        if self.last - self.due > self.PULSE:
            for child in list(self.children):
                if child._dead_by is None and child._noticed is None and not child.alive():
                    child._dead_by = silent_since
        if self.children:  # else no run to date: the next child starts the beat again
            age = self.last - self.born
            self._schedule(loop, min(self.SLOWEST, max(self.PULSE, age * self.AGE_FRACTION)))

    def gap(self) -> float:
        """How long the loop was silent before now, if that was a stall; else 0."""
        now = time.monotonic()
        stalled = self._handle is not None and now - self.due > self.PULSE
        return now - self.last if stalled else 0.0


_PULSE = _LoopPulse()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
