"""What one sample of a program is made of, and what a run of samples means:
the process tree read from /proc, and the hysteresis that turns consecutive
samples over a limit into a finding.

Reading /proc directly is what keeps a sample cheap enough to watch hundreds
of programs:

- the main process and its known descendants are read from
  ``/proc/PID/stat`` and a listing of ``/proc/PID/fd``; sockets are counted
  from the fd links only when a ``connections`` limit is set (psutil's
  ``net_connections`` parses every socket of the machine);
- descendants are found from one pass over ``/proc/*/stat`` (`children_map`)
  that the sampler shares between all programs and redoes only now and
  then: a Go service's tree rarely changes, and a full pass per sample would
  cost more than all the rest (``/proc/PID/task/*/children`` would be
  cheaper, but needs a kernel built with CONFIG_PROC_CHILDREN), and is
  skipped altogether when no process was made anywhere since the last one
  (`last_pid`: the kernel's most recent pid, one read of /proc/loadavg).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.config import LimitsSpec

# config key of a limit -> the figure it applies to
LIMIT_FIGURES = {
    "rss": "rss_bytes",
    "open_fds": "open_fds",
    "threads": "threads",
    "connections": "connections",
    "goroutines": "goroutines",
    "heap_inuse": "heap_inuse_bytes",
}


# -- limits with hysteresis ----------------------------------------------------------


@dataclass(frozen=True)
class Breach:
    metric: str  # the config key: rss, goroutines, ...
    value: int
    limit: int
    samples: int  # consecutive samples over the limit
    values: tuple[int, ...]  # those samples, oldest first


class Hysteresis:
    """Counts consecutive samples over each limit of one process (monit's "for N
    cycles"); fires once, when a count reaches ``sustain``. A sample that lacks
    a figure (a failed scrape) neither counts nor breaks the run: an endpoint
    that stops answering is never a reason to kill, nor an alibi for a leak."""

    def __init__(self, limits: LimitsSpec) -> None:
        self.sustain = limits.sustain
        self.limits = {m: v for m in LIMIT_FIGURES if (v := getattr(limits, m)) is not None}
        self.runs: dict[str, list[int]] = {m: [] for m in self.limits}
        self.fired = False

    def observe(self, figures: Mapping[str, Any]) -> Breach | None:
        if self.fired:
            return None
        for metric, limit in self.limits.items():
            value = figures.get(LIMIT_FIGURES[metric])
            if value is None:
                continue
            run = self.runs[metric]
            if value > limit:
                run.append(int(value))
                del run[: -self.sustain]
            else:
                run.clear()
        for metric, run in self.runs.items():
            if len(run) >= self.sustain:
                self.fired = True
                return Breach(metric, run[-1], self.limits[metric], len(run), tuple(run))
        return None

    def pending(self) -> dict[str, int]:
        """Limits currently over, with how many samples in a row."""
        return {m: len(run) for m, run in self.runs.items() if run}


# -- the process tree ----------------------------------------------------------------


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from one pass over /proc/*/stat."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rfind(b")") + 2 :].split(maxsplit=2)[1])
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
        out.setdefault(ppid, []).append(int(name))
    return out


def last_pid() -> int | None:
    """The pid the kernel handed out last (in gosup's pid namespace), from
    /proc/loadavg; None when unreadable. Unchanged means no process (nor
    thread) was made since: no new descendant can have appeared."""
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[4])
    except (OSError, ValueError, IndexError):
        return None


class ProcessTree:
    """One child's process tree, summed: the main process every sample, its
    descendants as last found by `refresh`.

    Each process is read from ``/proc/PID/stat`` (state, threads and rss in one
    read) and a listing of ``/proc/PID/fd``: half the cost of psutil's
    oneshot() with memory_info/num_threads/num_fds, which reads three files.
    A process is known by pid and start time, so a reused pid is never counted.

    With ``look=False`` the main process is not read until the first `sample`:
    the caller vouches that ``pid`` is its own unreaped child until then (it
    cannot be reused) and calls `sample` only while it is.
    """

    def __init__(self, pid: int, *, look: bool = True) -> None:
        self.pid = pid
        self.procs: dict[int, int] = {}  # pid -> start time (clock ticks after boot)
        self.unread = not look  # the main process, until its first sample
        if look:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.procs[pid] = _read_stat(pid)[3]

    def refresh(self, children: Mapping[int, list[int]]) -> None:
        found, pending = set(), [self.pid]
        while pending:
            pid = pending.pop()
            found.add(pid)
            pending.extend(c for c in children.get(pid, ()) if c not in found)
        if self.unread:
            found.discard(self.pid)  # the first sample reads it
        for pid in found - self.procs.keys():
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.procs[pid] = _read_stat(pid)[3]

    def sample(self, sockets: bool) -> dict[str, int] | None:
        """Summed figures; None when the main process is gone (it is exiting)."""
        totals = dict.fromkeys(("rss_bytes", "open_fds", "threads"), 0)
        if sockets:
            totals["connections"] = 0
        procs = list(self.procs.items())
        if self.unread:
            procs.insert(0, (self.pid, -1))
        for pid, started in procs:
            try:
                state, threads, rss, start = _read_stat(pid)
                if started == -1:  # the main process's first sample
                    self.unread = False
                    self.procs[pid] = started = start
                if state == b"Z" or start != started:
                    raise ProcessLookupError(pid)  # exited, or the pid is someone else's now
                fds, socks = _fd_counts(pid, sockets)
            except (OSError, ValueError, IndexError):
                if pid == self.pid:
                    return None
                del self.procs[pid]  # a descendant vanished mid-sample
                continue
            totals["rss_bytes"] += rss
            totals["threads"] += threads
            totals["open_fds"] += fds
            if sockets:
                totals["connections"] += socks
        return totals


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _read_stat(pid: int) -> tuple[bytes, int, int, int]:
    """(state, threads, rss bytes, start time) from /proc/PID/stat."""
    fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)  # no file object: half the Python work
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    # After "pid (comm) " the fields count from 3 (state); comm may hold spaces.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0], int(fields[17]), int(fields[21]) * _PAGE, int(fields[19])


def _fd_counts(pid: int, sockets: bool) -> tuple[int, int]:
    """Open fds, and (only when asked: a readlink each) how many are sockets.
    Linux >= 6.2 gives the count as the size of /proc/PID/fd: one stat
    instead of listing a directory of thousands of entries."""
    fd_dir = f"/proc/{pid}/fd"
    if not sockets and (count := os.stat(fd_dir).st_size) > 0:
        return count, 0
    names = os.listdir(fd_dir)
    if not sockets:
        return len(names), 0
    count = 0
    for name in names:
        with contextlib.suppress(OSError):
            count += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
    return len(names), count
