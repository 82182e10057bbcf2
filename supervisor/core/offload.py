"""File writes that can stall, done off the loop and out of the shared pool.

DESIGN §1: the loop never waits on anything that can stall. A dump written
to a slow or hung disk, or pids.json rewritten there, can take seconds or
never finish. ``asyncio.to_thread`` would take it off the loop, but into
the default executor, where config applies, spawns and /proc scans run: a
few stuck writes would fill it, and supervision would wait behind logging.
So these writes get their own few threads (``DISK``), like the history
reads of the control socket get theirs.

The threads are daemon threads: a write stuck for good on a hung disk must
not keep gosup from exiting (the default executor and ThreadPoolExecutor
both join their threads at exit). What such a write was for is lost; the
file it was writing is a temporary one, never the real name.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Job = Callable[[], None]


class Workers:
    """At most ``size`` daemon threads running blocking calls for the loop, in order."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` in one of the threads; its result or exception.
        Cancelling the caller does not stop the call (nothing can): its
        outcome is dropped."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: object) -> None:
            if done.done():
                return
            if ok:
                done.set_result(value)  # type: ignore[arg-type]
            else:
                assert isinstance(value, BaseException)
                done.set_exception(value)

        def job() -> None:
            try:
                outcome: tuple[bool, object] = (True, fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller, whatever it is
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, *outcome)

        self._submit(job)
        return await done

    def _submit(self, job: _Job) -> None:
        with self._lock:
            self._jobs.put(job)
            if self._idle == 0 and len(self._threads) < self.size:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            job()


# Dumps and pids.json (health/evidence.py, service/orphans.py).
DISK = Workers("gosup-disk", 2)
