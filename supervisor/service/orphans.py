"""Nothing gosup started may outlive it.

Three parts, one concern (that only one gosup runs per state_dir is the
flock of ``control.ControlServer``, taken before this service starts):

**Pid records.** ``<state_dir>/pids.json`` holds gosup's own pid and, for
every program whose child runs, its pid, start time, process group and
session. A history listener keeps it current from the ``started``,
``exited`` and ``stopped`` records, so it is written when the history says
a child came or went, and only then. A clean exit removes the file. The
writes run in gosup's disk threads (``core/offload.py``), one at a time and
at most one per ``PIDS_WINDOW`` (100 ms): a slow or stalled disk delays the
file, never the loop, and the changes made meanwhile are written together.
That the file may lag a start by up to the window is safe: the child of a
gosup SIGKILLed meanwhile dies with it (its parent-death signal), and what
the child started carries the marks the next gosup finds it by.

**Clearing leftovers at start.** A gosup killed with SIGKILL cannot stop
anything. Its direct children (programs, builds, validators) die with it
(``PR_SET_PDEATHSIG``), but their own children do not: a Go program's
helpers in the same process group, helpers that called ``setsid`` and left
it, a build's compiler. Every child therefore carries ``GOSUP_STATE_DIR``
(and ``GOSUP_PROGRAM``) in its environment (``spawn.marks``), which its
descendants inherit. Before any program starts, the next gosup of the same
state_dir stops whatever the previous one left: the recorded pids, the rest
of their process groups and sessions, and the processes carrying our
``GOSUP_STATE_DIR``. SIGTERM first, then SIGKILL after a short grace, for
all programs at once. Each program found this way gets a ``stopped``
record with ``reason = "leftover"``.

Anyone can put our marks in an environment, and pids get reused, so a
process is taken for a leftover only when it is provably ours (``Trust``):
it runs as a uid gosup runs that program as (gosup's own, or the program's
``user``), it started after the previous gosup (its start time is in
pids.json) and before this one, and it carries the marks or belongs to a
recorded group; a recorded pid must also still have its recorded start
time. Without a record of the previous gosup nothing is swept. Processes
of other users are rejected by the owner of their ``/proc`` entry, before
their environment is even read, so a decoy costs nothing and writes
nothing into the history.

**A predecessor that died.** When the history's last supervisor record is
a start or a reload (no ``supervisor_stopped``), the previous gosup was
killed or crashed: ``supervisor_lost`` (its pid, the time of its last
record) is written first, then an ``exited`` record with ``reason =
"lost"`` for each program pids.json says it had running.

**PID 1, and the subreaper.** As a container's entrypoint, gosup inherits
every orphan of the container; as the child subreaper it is everywhere
(``spawn.become_subreaper``), it inherits its programs' orphans. It must
reap them, or zombies pile up. It must not reap its own children, though:
``Popen`` (programs, builds and validators are all ``Popen`` children)
needs those exit statuses. So the reaper never calls
``waitpid(-1)``: it looks at gosup's zombie children (in a thread: it
reads ``/proc/self/task/*/children``, and the state of each child that is
not a program's current one, so a look costs the same with 1,000 programs
as with one) and only reaps one that is not a program's current child,
that was already a zombie at the previous look, and that no live ``Popen``
object still has to wait for (a validator's is waited for only after its
output reached EOF or its deadline, which a helper the child left behind
can hold off). It looks when SIGCHLD says a child ended, then once a
second for as long as a zombie is left: an idle gosup does not wake up for it.

The same adoption makes a crash cheap: the helpers a crashed run left
(``escapees``, swept before the next start) are among those adopted
children, so only their environments are read (``adopted_marked``); the
scan of every process's environment (``marked``) is left for a gosup that
could not become a subreaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor.config import ProgramSpec
from supervisor.core import spawn
from supervisor.core.offload import DISK
from supervisor.core.tasks import cancel_and_wait
from supervisor.history import Last

if TYPE_CHECKING:
    import psutil  # imported where used: an idle daemon never loads it (issue 18, RSS)

    from supervisor.service.daemon import Supervisor

STATE_DIR_VAR = spawn.STATE_DIR_VAR
PROGRAM_VAR = spawn.PROGRAM_VAR
PIDS_FILE = "pids.json"
LEFTOVER_GRACE_MAX = 10.0  # seconds a leftover gets to stop after SIGTERM, at most
REAP_INTERVAL = 1.0
PIDS_WINDOW = 0.1  # seconds: pids.json is written at most once per window
CREATE_TIME_SLACK = 0.01  # psutil start times are exact to a clock tick


# -- pid records ------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    create_time: float
    pgid: int | None = None
    sid: int | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessRecord | None:
        """The record of ``pid`` now; None when it is gone. Its start time
        from ``/proc/PID/stat`` (``create_time``), not psutil: pids.json is
        written by every daemon, idle ones too."""
        create_time = _create_time(pid)
        if create_time is None:
            return None
        return cls(pid, create_time, _id(os.getpgid, pid), _id(os.getsid, pid))

    def json(self) -> str:
        """The record as pids.json holds it (``read`` takes it back)."""
        return json.dumps(
            {"pid": self.pid, "create_time": self.create_time, "pgid": self.pgid, "sid": self.sid}
        )

    def process(self, zombie: bool = False) -> psutil.Process | None:
        """The recorded process if it still exists (not a reused pid); a zombie
        only when asked for."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            same = abs(proc.create_time() - self.create_time) <= CREATE_TIME_SLACK
            if same and (zombie or proc.status() != psutil.STATUS_ZOMBIE):
                return proc
        except psutil.Error:
            pass
        return None


def _create_time(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch, as psutil's
    ``create_time()`` says it (so records of either compare): its start in
    clock ticks since boot (``/proc/PID/stat``) plus the boot time
    (``btime`` in ``/proc/stat``). None when it is gone."""
    fields = spawn.proc_stat(pid)
    if fields is None:
        return None
    try:
        return int(fields[19]) / _CLK_TCK + _boot_time()
    except OSError:
        return None


_CLK_TCK = os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime"):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _id(fn: Any, pid: int) -> int | None:
    try:
        value: int = fn(pid)
        return value
    except OSError:
        return None


class PidFile:
    """``pids.json``: this gosup and the current child of each program.

    What the loop keeps is ``pids`` (program -> the pid of its current
    child), a dict updated from the history records: nothing else happens
    there. The file is written in a disk thread, and only when that set
    changed since the last write: the first change at once, then at most one
    write per ``window``, which carries every change made meanwhile (a crash
    loop of 200 programs costs ten writes a second, not two per run, and a
    state change that keeps the set costs nothing). The start time, group
    and session of a new pid are read in that thread too, and each program's
    line is encoded once per pid.
    """

    def __init__(self, path: Path, window: float = PIDS_WINDOW) -> None:
        self.path = path
        self.window = window
        self.pids: dict[str, int] = {}  # the loop's: what the file should say
        # The writer's (one at a time): what the file says, and its lines.
        self.programs: dict[str, ProcessRecord] = {}
        self._lines: dict[str, tuple[int, str]] = {}
        self.me = ProcessRecord.of(os.getpid())
        self.writes = 0  # files written (the tests count them)
        self._written: dict[str, int] | None = None  # the set last written; None: none yet
        self._failing = False
        self._dirty = False  # a change not written yet
        self._writer: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()  # drain(): no pause between rounds

    @staticmethod
    def read(path: Path) -> tuple[ProcessRecord | None, dict[str, ProcessRecord]]:
        """The recorded gosup and children; nothing for a missing or damaged file."""
        try:
            data = json.loads(path.read_text())
            me = data.get("supervisor")
            progs = data.get("programs", {})
            return (
                ProcessRecord(**me) if me else None,
                {name: ProcessRecord(**rec) for name, rec in progs.items()},
            )
        except (OSError, ValueError, TypeError, AttributeError):
            return None, {}

    def on_record(self, rec: dict[str, object]) -> None:
        """History listener: a child came (started) or went (exited, stopped).

        This runs on the restart path (exited -> started) and only updates
        ``pids``; the file follows within ``window``. If gosup dies in
        between, its programs' children die with it (the parent-death
        signal), and what they left is found at the next start by the
        ``GOSUP_*`` marks; a stale entry is harmless (each recorded pid's
        start time is checked).
        """
        event, name, pid = rec.get("event"), rec.get("program"), rec.get("pid")
        if not isinstance(name, str) or not isinstance(pid, int):
            return
        if event == "started" and self.pids.get(name) != pid:
            self.pids[name] = pid
        elif event in ("exited", "stopped") and self.pids.get(name) == pid:
            del self.pids[name]
        else:
            return  # the set is what it was: nothing to write
        self.write_soon()

    async def drain(self) -> None:
        """Wait until every change made so far is written (or failed to be)."""
        self._hurry.set()
        try:
            while self._writer is not None and not self._writer.done():
                await asyncio.shield(self._writer)
        finally:
            self._hurry.clear()

    def write_soon(self) -> None:
        """Rewrite the file off the loop: one writer at a time, at most once
        per window, and the changes made meanwhile go in its next round."""
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_rounds())

    async def _write_rounds(self) -> None:
        while self._dirty:
            self._dirty = False
            wanted = dict(self.pids)
            if wanted == self._written:
                continue  # changed and changed back meanwhile
            if await DISK.run(self._write_pids, wanted):
                self._written = wanted
            # The changes of the next window wait for its end and go together.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.window):
                    await self._hurry.wait()

    def _write_pids(self, pids: dict[str, int]) -> bool:
        """(In a disk thread.) The records of ``pids`` (a pid gone already
        is left out), then the file."""
        records = {}
        for name, pid in pids.items():
            old = self.programs.get(name)
            rec = old if old is not None and old.pid == pid else ProcessRecord.of(pid)
            if rec is not None:
                records[name] = rec
        self.programs = records
        return self.write()

    def _text(self) -> str:
        """The file: one line per program, each encoded once per pid."""
        lines = []
        for name, rec in self.programs.items():
            cached = self._lines.get(name)
            if cached is None or cached[0] != rec.pid:
                cached = self._lines[name] = (rec.pid, f"  {json.dumps(name)}: {rec.json()}")
            lines.append(cached[1])
        for name in self._lines.keys() - self.programs.keys():
            del self._lines[name]
        me = self.me.json() if self.me else "null"
        body = ",\n".join(lines)
        return f'{{\n "supervisor": {me},\n "programs": {{\n{body}\n }}\n}}\n'

    def write(self) -> bool:
        """Rewrite the file from ``programs``: blocking, so in a thread. A
        failure (disk full, the state_dir deleted and not re-creatable) is
        logged once per burst, never raised: the next change rewrites it whole."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(self._text())
            tmp.replace(self.path)  # never half a file, even if we die right here
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._failing:
                logger.error("cannot write {}: {}", self.path, exc)
            self._failing = True
            return False
        self._failing = False
        self.writes += 1
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# -- leftovers and escapees -------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """What makes a process provably one of ours.

    ``uids``: per program, the uids its processes may run as (gosup's
    effective uid, and the program's ``user``); a program not in the config
    (removed since) gets ``default_uids``. ``after``/``before``: the window
    its start time must fall in (None: no lower bound).
    """

    uids: dict[str, frozenset[int]]
    default_uids: frozenset[int]
    after: float | None
    before: float

    @property
    def any_uid(self) -> frozenset[int]:
        return self.default_uids.union(*self.uids.values())

    def allows(self, proc: psutil.Process, name: str) -> bool:
        """``proc`` runs as one of ``name``'s uids and started in the window."""
        import psutil

        allowed = self.uids.get(name, self.default_uids)
        try:
            real, effective, _saved = proc.uids()
            started = proc.create_time()
        except psutil.Error:
            return False
        if real not in allowed or effective not in allowed:
            return False
        if self.after is not None and started < self.after - CREATE_TIME_SLACK:
            return False
        return started <= self.before


def program_uids(specs: Iterable[ProgramSpec]) -> dict[str, frozenset[int]]:
    """Each program's uids: gosup's own, and its ``user``'s (a user lookup:
    call it off the loop). An unknown user adds nothing."""
    me = os.geteuid()
    found = {}
    for spec in specs:
        uids = {me}
        with contextlib.suppress(spawn.SpawnError, OSError, KeyError):
            identity = spawn.resolve_identity(spec.user, spec.group)
            if identity is not None:
                uids.add(identity.uid)
        found[spec.name] = frozenset(uids)
    return found


def _environ(proc: psutil.Process) -> dict[str, str]:
    import psutil

    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def _proc_owner(pid: str) -> int | None:
    """The effective uid of ``pid`` (the owner of its /proc entry), cheaply."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def with_environment(*entries: str, uids: frozenset[int] | None = None) -> list[psutil.Process]:
    """Processes (zombies included) whose environment holds every ``KEY=VALUE``
    of ``entries`` exactly, run by one of ``uids`` (None: by anyone). Reads
    /proc/*/environ directly (about 0.4 ms for 70 processes), and only of
    processes of ``uids``; the caller is never listed."""
    import psutil

    needles = _needles(entries)
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if uids is not None and _proc_owner(entry.name) not in uids:
            continue
        if _environ_holds(entry.name, needles):
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(int(entry.name)))
    return found


def _needles(entries: Iterable[str]) -> list[bytes]:
    return [b"\0" + entry.encode() + b"\0" for entry in entries]


def _environ_holds(pid: str | int, needles: list[bytes]) -> bool:
    """Whether /proc/PID/environ holds every one of ``needles`` (``_needles``)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = b"\0" + f.read()
    except OSError:
        return False
    return all(needle in env for needle in needles)


def marked(state_dir: Path, program: str, trust: Trust | None = None) -> list[psutil.Process]:
    """Live processes carrying this gosup's marks for ``program`` (and, with
    ``trust``, provably ours).

    On a crash this finds the helpers that left the child's group (setsid):
    once the child is gone they are re-parented and no tree leads to them.
    The program's next run is not started yet, so everything found is leftover.
    """
    uids = None if trust is None else trust.uids.get(program, trust.default_uids)
    procs = with_environment(f"{STATE_DIR_VAR}={state_dir}", f"{PROGRAM_VAR}={program}", uids=uids)
    if trust is None:
        return procs
    return [p for p in procs if trust.allows(p, program)]


def adopted_marked(state_dir: Path, program: str, trust: Trust) -> list[psutil.Process]:
    """``marked``, for a gosup that adopts orphans (the child subreaper, or
    PID 1): when a run's child dies, the helpers it left are re-parented to
    gosup, so they are among gosup's own children that it did not start, or
    their descendants (``spawn.adopted``: ``/proc/self/task/*/children``).
    Only their environments are read, not every process's. (A running
    validator or build of the program is a child gosup started: not swept.)"""
    needles = _needles((f"{STATE_DIR_VAR}={state_dir}", f"{PROGRAM_VAR}={program}"))
    return [
        proc
        for proc in spawn.adopted(program)
        if _environ_holds(proc.pid, needles) and trust.allows(proc, program)
    ]


def find_leftovers(
    state_dir: Path, records: dict[str, ProcessRecord], trust: Trust
) -> dict[str, list[psutil.Process]]:
    """Processes of a previous gosup of ``state_dir``, by program name: the
    recorded ones (same start time), members of their groups and sessions,
    and processes carrying our marks; each only when ``trust`` allows it."""
    import psutil

    found: dict[str, dict[int, psutil.Process]] = {}
    groups: dict[int, tuple[str, ProcessRecord]] = {}
    for name, rec in records.items():
        if trust.after is not None and rec.create_time < trust.after - CREATE_TIME_SLACK:
            continue  # not started by the previous gosup: not ours to judge
        proc = rec.process()
        if proc is not None and trust.allows(proc, name):
            found.setdefault(name, {})[proc.pid] = proc
        # The group is the recorded one while its leader is (even as a zombie),
        # or gone: the kernel reuses no pid that still names a group.
        leader_known = rec.process(zombie=True) is not None or not psutil.pid_exists(rec.pid)
        for group in (rec.pgid, rec.sid):
            if group is not None and leader_known:
                groups[group] = (name, rec)
    marker = str(state_dir)
    owners = trust.any_uid
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    for entry in os.scandir("/proc"):
        # The owner first: another user's process is never looked at further.
        if not entry.name.isdigit() or _proc_owner(entry.name) not in owners:
            continue
        try:
            proc = psutil.Process(int(entry.name))
            if proc.pid in mine or proc.status() == psutil.STATUS_ZOMBIE:
                continue  # a zombie has nothing left to stop
        except psutil.Error:
            continue
        owner = _leftover_name(proc, marker, groups)
        if owner is not None and trust.allows(proc, owner):
            found.setdefault(owner, {})[proc.pid] = proc
    return {name: list(procs.values()) for name, procs in found.items()}


def _older_than(proc: psutil.Process, limit: float) -> bool:
    import psutil

    try:
        return proc.create_time() <= limit
    except psutil.Error:
        return False


def _leftover_name(
    proc: psutil.Process, marker: str, groups: dict[int, tuple[str, ProcessRecord]]
) -> str | None:
    env = _environ(proc)
    if env.get(STATE_DIR_VAR) == marker:
        return env.get(PROGRAM_VAR) or "?"
    for group in (_id(os.getpgid, proc.pid), _id(os.getsid, proc.pid)):
        if group in groups:
            name, rec = groups[group]
            # Members of a recorded group are no younger than its leader.
            if not _older_than(proc, rec.create_time - CREATE_TIME_SLACK):
                return name
    return None


async def stop_leftovers(procs: list[psutil.Process], grace: float) -> bool:
    """SIGTERM, wait up to ``grace``, then SIGKILL the rest; True when SIGKILL was needed."""
    import psutil

    procs = spawn.alive(procs)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    loop = asyncio.get_running_loop()
    survivors = await spawn.wait_gone(procs, grace, loop.time)
    if not survivors:
        return False
    spawn.kill_tree(survivors)
    survivors = await spawn.wait_gone(survivors, 5.0, loop.time)
    if survivors:
        logger.error("leftovers survived SIGKILL: pids {}", [p.pid for p in survivors])
    return True


# -- PID 1 ------------------------------------------------------------------------------


class Reaper:
    """Reaps orphaned zombies (gosup is PID 1 or a subreaper), never a child someone waits for."""

    def __init__(self, sup: Supervisor, interval: float = REAP_INTERVAL) -> None:
        self.sup = sup
        self.interval = interval
        self.reaped = 0
        self._seen: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reaper")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        # A zombie only appears after a SIGCHLD: wait for one, then look again
        # every ``interval`` while a zombie is left (the second look reaps it).
        # Without a router (not under ``Supervisor.run``) every ``interval``.
        router = self.sup.signals
        ended, polling = asyncio.Event(), router is None
        ended.set()  # a first look: orphans inherited before the handler
        if router is not None:
            router.on(signal.SIGCHLD, lambda _sig: ended.set())
        try:
            while True:
                if polling or self._seen or ended.is_set():
                    await asyncio.sleep(self.interval)
                else:
                    await ended.wait()
                ended.clear()
                try:
                    # Reads a file per child gosup did not start: in a thread.
                    zombies = await asyncio.to_thread(_zombie_children, self._ours())
                    self.reap_once(zombies)
                except Exception as exc:  # the next look may do better
                    logger.opt(exception=exc).error("reaping orphans failed: {}", exc)
        finally:
            if router is not None:
                router.release(signal.SIGCHLD)

    def reap_once(self, zombie_children: set[int] | None = None) -> None:
        """Reap what was a zombie at the previous look too; ``zombie_children``
        is the scan (``_zombie_children``), made here when not given."""
        if zombie_children is None:
            zombie_children = _zombie_children(self._ours())
        zombies = zombie_children - self._ours()
        candidates = zombies & self._seen
        if candidates:  # (rare: the scan of the heap is only paid for a stale zombie)
            candidates -= _awaited()
        for pid in candidates:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    self.reaped += 1
                    logger.debug("reaped orphan pid {}", pid)
        self._seen = zombies

    def _ours(self) -> set[int]:
        """The programs' current children: never reaped here, not even looked at."""
        return {p.pid for p in self.sup.programs.values() if p.pid is not None}


def _zombie_children(skip: Iterable[int] = ()) -> set[int]:
    """The pids of gosup's children that are zombies, ``skip`` aside. Only
    the others' states are read (``/proc/PID/stat``): with 1,000 programs
    and no orphan, a look reads gosup's children lists and nothing else."""
    zombies = set()
    for pid in spawn.own_children().difference(skip):
        if _state(pid) == "Z":
            zombies.add(pid)
    return zombies


def _state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, Z ...), None when it is gone."""
    fields = spawn.proc_stat(pid)
    return fields[0].decode() if fields is not None else None


def _awaited() -> set[int]:
    """Children a live ``Popen`` has yet to wait for. A validator's output is
    read to EOF (or its deadline) before it is waited for: one that exited
    while a helper it left still holds the pipe stays a zombie meanwhile, and
    reaping it would make Popen see ECHILD and report exit code 0."""
    return {
        obj.pid
        for obj in gc.get_objects()
        if isinstance(obj, subprocess.Popen) and obj.returncode is None
    }


# -- the service ------------------------------------------------------------------------


class OrphanService:
    """Clears a previous gosup's leftovers, keeps pids.json, reaps as PID 1."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.state_dir = sup.config.supervisor.state_dir.resolve()
        self.pids = PidFile(self.state_dir / PIDS_FILE)
        self.reaper: Reaper | None = None
        # (No record of itself only where /proc/self/stat cannot be read: then
        # now, before any program of this gosup started, is the bound.)
        self.born = self.pids.me.create_time if self.pids.me else time.time()
        self._uids: dict[str, frozenset[int]] = {}
        self.adopts = False  # orphans of our children come to us (subreaper, PID 1)

    async def start(self) -> None:
        await self.clear_leftovers()
        self.pids.write_soon()  # a stalled disk delays the file, not the start
        self.sup.history.add_listener(self.pids.on_record)
        # A child subreaper (core/spawn.py): what a program double-forks stays
        # ours, to be stopped with it; its zombies are ours to reap, as PID 1's.
        self.adopts = spawn.become_subreaper() or os.getpid() == 1
        if self.adopts:
            self.reaper = Reaper(self.sup)
            self.reaper.start()

    async def close(self) -> None:
        if self.reaper is not None:
            await self.reaper.stop()
        with contextlib.suppress(ValueError):
            self.sup.history.remove_listener(self.pids.on_record)
        await self.pids.drain()  # no write in flight may bring the file back
        if not self.pids.pids:
            await DISK.run(self.pids.remove)

    def marks(self, spec: ProgramSpec) -> dict[str, str]:
        """An environment provider: our state_dir and the program's name."""
        return spawn.marks(self.state_dir, spec.name)

    def escapees(self, name: str) -> list[psutil.Process]:
        """Processes of ``name``'s past runs (under this gosup) found by
        their marks, run as one of its uids: among the orphans gosup adopted
        when it does (``adopted_marked``), else in all of /proc (``marked``)."""
        if name not in self._uids:  # added by a reload: one lookup, then cached
            spec = next((p for p in self.sup.config.programs if p.name == name), None)
            self._uids.update(program_uids([spec]) if spec else {})
        trust = Trust(self._uids, frozenset({os.geteuid()}), self.born, time.time())
        if self.adopts:
            return adopted_marked(self.state_dir, name, trust)
        return marked(self.state_dir, name, trust)

    async def clear_leftovers(self) -> None:
        """Record a predecessor that died, and stop what it left running.

        The previous gosup is gone: the control socket's lock, taken before
        this service starts, refused to start beside a live one. Every
        program's leftovers are stopped at once, so the whole sweep takes
        one grace period (``LEFTOVER_GRACE_MAX`` at most) and one SIGKILL
        wait, however many programs and processes there are.
        """
        previous, records = PidFile.read(self.pids.path)
        await self._record_lost(previous, records)
        specs = self.sup.config.programs
        self._uids = await asyncio.to_thread(program_uids, specs)
        if previous is None:
            return  # no record of who came before: nothing is provably ours
        trust = Trust(self._uids, frozenset({os.geteuid()}), previous.create_time, self.born)
        leftovers = await asyncio.to_thread(find_leftovers, self.state_dir, records, trust)
        grace = self._grace()

        async def stop(name: str, procs: list[psutil.Process]) -> None:
            pids = sorted(p.pid for p in procs)
            logger.warning("{}: stopping leftovers of a previous gosup: pids {}", name, pids)
            main = records[name].pid if name in records else pids[0]
            killed = await stop_leftovers(procs, grace)
            self.sup.history.record(
                "stopped", name, pid=main, reason="leftover", killed=killed, pids=pids
            )

        await asyncio.gather(*(stop(n, p) for n, p in sorted(leftovers.items())))

    async def _record_lost(
        self, previous: ProcessRecord | None, records: dict[str, ProcessRecord]
    ) -> None:
        """``supervisor_lost`` and an ``exited`` (reason lost) for each program
        it had running, when the previous gosup ended without
        ``supervisor_stopped``."""
        lost = await asyncio.to_thread(_last_words, self.sup.history.path, previous is not None)
        if lost is None:
            return
        last_ts, _ = lost
        pid = previous.pid if previous is not None else None
        logger.warning(
            "the previous gosup (pid {}) ended without stopping; last record {}", pid, last_ts
        )
        self.sup.history.record("supervisor_lost", pid=pid, last_ts=last_ts)
        for name, rec in sorted(records.items()):
            self.sup.history.record(
                "exited",
                name,
                pid=rec.pid,
                exit_code=None,
                signal=None,
                uptime_s=None,
                reason="lost",
            )

    def _grace(self) -> float:
        timeouts = [p.stop_timeout for p in self.sup.config.programs]
        return min(max(timeouts, default=1.0), LEFTOVER_GRACE_MAX)


def _last_words(path: Path, recorded: bool) -> tuple[str | None, str | None] | None:
    """(ts of the last record, last supervisor event) when the history says
    its gosup never stopped; None when it stopped, or never started.

    Bounded like every reader: when no supervisor record is within the scan
    limit, a recorded previous gosup (``recorded``, from pids.json) decides.
    """
    with Last(path, 1, event_prefix="supervisor_") as last:
        found = list(last)
        searched_all = last.complete
    if found:
        event = found[-1].get("event")
        if event not in ("supervisor_started", "supervisor_reloaded"):
            return None
    elif searched_all or not recorded:
        return None
    else:
        event = None
    with Last(path, 1) as tail:
        newest = list(tail)
    ts = newest[-1].get("ts") if newest else None
    return (ts if isinstance(ts, str) else None), (event if isinstance(event, str) else None)
