"""Nothing gosup started may outlive it.

Three parts, one concern (that only one gosup runs per state_dir is the
flock of ``control.ControlServer``, taken before this service starts):

**Pid records.** ``<state_dir>/pids.json`` holds gosup's own pid and, for
every program whose child runs, its pid, start time, process group and
session. A history listener keeps it current from the ``started``,
``exited`` and ``stopped`` records, so it is written exactly when the
history says a child came or went. A clean exit removes the file. The
writes run in gosup's disk threads (``core/offload.py``), one at a time: a
slow or stalled disk delays the file, never the loop, and the changes made
meanwhile are written together once it can be.

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
``waitpid(-1)``: it looks at gosup's zombie children (``/proc/self/task/*/children``
and their states, in a thread) and only reaps one that is not a program's
current child, that was already a zombie at the previous look, and that no
live ``Popen`` object still has to wait for (a validator's is waited for only
after its output reached EOF or its deadline, which a helper the child left
behind can hold off). It looks when SIGCHLD says a child ended, then once a
second for as long as a zombie is left: an idle gosup does not wake up for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from loguru import logger

from supervisor.config import ProgramSpec
from supervisor.core import spawn
from supervisor.core.offload import DISK
from supervisor.core.tasks import cancel_and_wait
from supervisor.history import Last

if TYPE_CHECKING:
    from supervisor.service.daemon import Supervisor

STATE_DIR_VAR = spawn.STATE_DIR_VAR
PROGRAM_VAR = spawn.PROGRAM_VAR
PIDS_FILE = "pids.json"
LEFTOVER_GRACE_MAX = 10.0  # seconds a leftover gets to stop after SIGTERM, at most
REAP_INTERVAL = 1.0
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
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        return cls(pid, create_time, _id(os.getpgid, pid), _id(os.getsid, pid))

    def process(self, zombie: bool = False) -> psutil.Process | None:
        """The recorded process if it still exists (not a reused pid); a zombie
        only when asked for."""
        try:
            proc = psutil.Process(self.pid)
            same = abs(proc.create_time() - self.create_time) <= CREATE_TIME_SLACK
            if same and (zombie or proc.status() != psutil.STATUS_ZOMBIE):
                return proc
        except psutil.Error:
            pass
        return None


def _id(fn: Any, pid: int) -> int | None:
    try:
        value: int = fn(pid)
        return value
    except OSError:
        return None


class PidFile:
    """``pids.json``: this gosup and the current child of each program."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.programs: dict[str, ProcessRecord] = {}
        self.me = ProcessRecord.of(os.getpid())
        self._pending: list[tuple[str, str, int]] = []
        self._failing = False
        self._dirty = False  # a change not written yet
        self._writer: asyncio.Task[None] | None = None

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

        The file is updated just after the event, not inside it: the listener
        runs on the restart path (exited -> started), and a restart must not
        wait for a file rewrite. If gosup dies in between, clearing leftovers at
        the next start checks each recorded pid's start time, so a stale entry is
        harmless, and a missing new child is still found by its environment tag.
        """
        event, name, pid = rec.get("event"), rec.get("program"), rec.get("pid")
        if not isinstance(name, str) or not isinstance(pid, int):
            return
        if event in ("started", "exited", "stopped"):
            self._pending.append((str(event), name, pid))
            if len(self._pending) == 1:
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Apply the pending events; the file is rewritten off the loop."""
        pending, self._pending = self._pending, []
        for event, name, pid in pending:
            if event == "started":
                found = ProcessRecord.of(pid)
                if found is not None:
                    self.programs[name] = found
            else:
                old = self.programs.get(name)
                if old is not None and old.pid == pid:
                    del self.programs[name]
        self.write_soon()

    async def drain(self) -> None:
        """Wait until every change made so far is written (or failed to be)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def write_soon(self) -> None:
        """Rewrite the file off the loop: one writer at a time, and the changes
        made while it writes go in its next round."""
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_rounds())

    async def _write_rounds(self) -> None:
        while self._dirty:
            self._dirty = False
            await DISK.run(self.write, self._data())

    def _data(self) -> dict[str, Any]:
        return {
            "supervisor": asdict(self.me) if self.me else None,
            "programs": {name: asdict(rec) for name, rec in self.programs.items()},
        }

    def write(self, data: dict[str, Any] | None = None) -> None:
        """Rewrite the file with ``data`` (now's, when None): blocking, so in a
        thread. A failure (disk full, the state_dir deleted and not
        re-creatable) is logged once per burst, never raised: the next change
        rewrites it whole."""
        data = self._data() if data is None else data
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(self.path)  # never half a file, even if we die right here
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not self._failing:
                logger.error("cannot write {}: {}", self.path, exc)
            self._failing = True
            return
        self._failing = False

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
    needles = [b"\0" + entry.encode() + b"\0" for entry in entries]
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        if uids is not None and _proc_owner(entry.name) not in uids:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if all(needle in env for needle in needles):
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(int(entry.name)))
    return found


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


def find_leftovers(
    state_dir: Path, records: dict[str, ProcessRecord], trust: Trust
) -> dict[str, list[psutil.Process]]:
    """Processes of a previous gosup of ``state_dir``, by program name: the
    recorded ones (same start time), members of their groups and sessions,
    and processes carrying our marks; each only when ``trust`` allows it."""
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
        # Without the handler (not the main thread) every ``interval``, as before.
        loop = asyncio.get_running_loop()
        ended, polling = asyncio.Event(), False
        ended.set()  # a first look: orphans inherited before the handler
        try:
            loop.add_signal_handler(signal.SIGCHLD, ended.set)
        except (RuntimeError, ValueError):
            polling = True
        try:
            while True:
                if polling or self._seen or ended.is_set():
                    await asyncio.sleep(self.interval)
                else:
                    await ended.wait()
                ended.clear()
                try:
                    # Reads a file per child of gosup: in a thread, never on the loop.
                    zombies = await asyncio.to_thread(_zombie_children)
                    self.reap_once(zombies)
                except Exception as exc:  # the next look may do better
                    logger.opt(exception=exc).error("reaping orphans failed: {}", exc)
        finally:
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGCHLD)

    def reap_once(self, zombie_children: set[int] | None = None) -> None:
        """Reap what was a zombie at the previous look too; ``zombie_children``
        is the scan (``_zombie_children``), made here when not given."""
        if zombie_children is None:
            zombie_children = _zombie_children()
        ours = {p.pid for p in self.sup.programs.values() if p.pid is not None}
        zombies = zombie_children - ours
        candidates = zombies & self._seen
        if candidates:  # (rare: the scan of the heap is only paid for a stale zombie)
            candidates -= _awaited()
        for pid in candidates:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    self.reaped += 1
                    logger.debug("reaped orphan pid {}", pid)
        self._seen = zombies


def _zombie_children() -> set[int]:
    """The pids of gosup's children that are zombies (a file read per child)."""
    zombies = set()
    for pid in spawn.own_children():
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                zombies.add(pid)
    return zombies


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
        self.born = self.pids.me.create_time if self.pids.me else psutil.Process().create_time()
        self._uids: dict[str, frozenset[int]] = {}

    async def start(self) -> None:
        await self.clear_leftovers()
        self.pids.write_soon()  # a stalled disk delays the file, not the start
        self.sup.history.add_listener(self.pids.on_record)
        # A child subreaper (core/spawn.py): what a program double-forks stays
        # ours, to be stopped with it; its zombies are ours to reap, as PID 1's.
        if spawn.become_subreaper() or os.getpid() == 1:
            self.reaper = Reaper(self.sup)
            self.reaper.start()

    async def close(self) -> None:
        if self.reaper is not None:
            await self.reaper.stop()
        with contextlib.suppress(ValueError):
            self.sup.history.remove_listener(self.pids.on_record)
        self.pids.flush()
        await self.pids.drain()  # no write in flight may bring the file back
        if not self.pids.programs:
            await DISK.run(self.pids.remove)

    def marks(self, spec: ProgramSpec) -> dict[str, str]:
        """An environment provider: our state_dir and the program's name."""
        return spawn.marks(self.state_dir, spec.name)

    def escapees(self, name: str) -> list[psutil.Process]:
        """Processes of ``name``'s past runs (under this gosup) found by
        their marks, run as one of its uids."""
        if name not in self._uids:  # added by a reload: one lookup, then cached
            spec = next((p for p in self.sup.config.programs if p.name == name), None)
            self._uids.update(program_uids([spec]) if spec else {})
        trust = Trust(self._uids, frozenset({os.geteuid()}), self.born, time.time())
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
