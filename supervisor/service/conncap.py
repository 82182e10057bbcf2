"""How many connections a server of gosup's keeps open, and for how long.

The control socket and ``metrics_listen`` both accept whatever connects. A
connection is a file descriptor, and gosup's descriptors are also what its
programs' pipes, log files and pidfds are made of: 2,000 idle connections
under ``ulimit -n 1024`` used to make ``gosup status`` fail and a
crash-looping program go FATAL with "Too many open files". So:

- each server keeps at most ``limit`` connections open;
- a connection that waits for its request longer than ``idle_timeout`` is
  closed (the server wraps its read in `Connections.waiting`);
- when the limit is reached, the connection that has been idle the longest
  is closed to make room for the newcomer, so a flood of idle connections
  cannot lock out ``gosup status`` or Prometheus; only when every open
  connection is busy (a request being served) is the newcomer refused;
- those closings and refusals are logged once per burst (`BurstLog`), not
  once each: a flood must not become a flood of log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loguru import logger


class BurstLog:
    """One warning when something starts happening in bursts, one line with
    the count once it has been quiet for ``quiet`` seconds."""

    def __init__(self, begins: str, ends: str, quiet: float = 5.0) -> None:
        self.begins = begins  # logged at the first event of a burst
        self.ends = ends  # "{n}" is the burst's count
        self.quiet = quiet
        self.total = 0  # events since gosup started
        self._count = 0
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def hit(self) -> None:
        loop = asyncio.get_running_loop()
        self.total += 1
        if self._count == 0:
            logger.warning(self.begins)
        self._count += 1
        self._last = loop.time()
        if self._handle is None:
            self._handle = loop.call_later(self.quiet, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_since = loop.time() - self._last
        if quiet_since < self.quiet:
            self._handle = loop.call_later(self.quiet - quiet_since, self._check)
            return
        self._handle = None
        logger.warning(self.ends.format(n=self._count))
        self._count = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@dataclass
class _Conn:
    close: Callable[[], None]
    idle_since: float | None  # loop time; None while a request is being served


class Connections:
    """The open connections of one server (one task each)."""

    def __init__(self, what: str, limit: int, idle_timeout: float) -> None:
        self.what = what
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._open: dict[asyncio.Task[object], _Conn] = {}
        self.log = BurstLog(
            f"{what}: {limit} connections open: closing the longest idle ones and refusing "
            "new ones while all are busy (logged once per burst)",
            f"{what}: {{n}} connections closed or refused in the last burst",
        )

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, close: Callable[[], None]) -> bool:
        """Count the current task's connection in; False when it must be
        refused. ``close`` ends it without waiting (when it is the one the
        next newcomer pushes out)."""
        loop = asyncio.get_running_loop()
        if len(self._open) >= self.limit:
            idle = [c for c in self._open.items() if c[1].idle_since is not None]
            self.log.hit()
            if not idle:
                return False
            task, oldest = min(idle, key=lambda c: c[1].idle_since or 0.0)
            del self._open[task]
            oldest.close()
        self._open[_me()] = _Conn(close, loop.time())
        return True

    def leave(self) -> None:
        """The current task's connection is over."""
        self._open.pop(_me(), None)

    def busy(self) -> None:
        """A request arrived: this connection is not idle (not pushed out) until `waiting`."""
        conn = self._open.get(_me())
        if conn is not None:
            conn.idle_since = None

    @contextlib.asynccontextmanager
    async def waiting(self) -> AsyncIterator[None]:
        """Around a read of the next request: idle (the first to be pushed out
        when the server is full) until it arrives; TimeoutError after
        ``idle_timeout``."""
        conn = self._open.get(_me())
        if conn is not None and conn.idle_since is None:
            conn.idle_since = asyncio.get_running_loop().time()
        async with asyncio.timeout(self.idle_timeout):
            yield

    def close_all(self) -> None:
        for conn in list(self._open.values()):
            conn.close()
        self._open.clear()
        self.log.close()


def _me() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task
