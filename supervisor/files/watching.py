"""Watching directories: watchdog's threads on one side, gosup's loop on the other.

Everything gosup knows lives on one asyncio loop and is touched from that
loop only, which is why none of it needs a lock. watchdog cannot work that
way: its observers read inotify, or scan directories, in threads of their
own. So this is the one place where those threads meet the loop, and the
rule here is narrow: in the observer's thread, ``pick`` may only decide
whether an event matters and what to hand over (a path comparison, nothing
that blocks or touches gosup's state); what it picks goes to the loop with
``call_soon_threadsafe``, and that is all the thread does. Debouncing,
hashing, building and everything else happens on the loop, in the feature
that owns the watch (configsync, builder).

Which observer: inotify normally. A polling observer (a directory scan every
``poll_interval``) when the caller or ``GOSUP_FORCE_POLLING=1`` asks for it
(network filesystems and FUSE mounts accept inotify watches but never report
changes made elsewhere), or when inotify refuses with an OSError (the
per-user watch or instance limit is reached). That fallback is logged once
per label, not once per program. Starting and stopping run in a thread: a
recursive inotify watch walks the whole tree, and a poller's first scan reads
every directory.

A watched directory that is removed loses its watch for good (the kernel
drops it), and one missing at the start has none. When the owner passes
``rearmed``, a directory that appears, or is made again, is watched anew
within ``REARM_INTERVAL``, and ``rearmed`` is called so the owner can look
for what arrived before the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

from loguru import logger
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

from supervisor.core.tasks import cancel_and_wait

T = TypeVar("T")
FORCE_POLLING_ENV = "GOSUP_FORCE_POLLING"
EventFilter = list[type[FileSystemEvent]]
REARM_INTERVAL = 1.0  # seconds between looks for watched directories made (again)
MOVE_PAIRING = 0.02  # seconds watchdog holds a rename's first half for its second
_warned: set[str] = set()  # labels whose inotify failure was already logged


def polling_forced() -> bool:
    """Does the environment ask for polling observers (``GOSUP_FORCE_POLLING=1``)?"""
    return os.environ.get(FORCE_POLLING_ENV, "").strip().lower() in ("1", "true", "yes")


class Watch(FileSystemEventHandler, Generic[T]):
    """Directories watched for as long as a feature runs; what ``pick`` keeps
    of an event (in watchdog's thread) reaches ``deliver`` on the loop."""

    def __init__(
        self,
        dirs: Iterable[Path],
        *,
        pick: Callable[[FileSystemEvent], T | None],
        deliver: Callable[[T], None],
        event_filter: EventFilter,
        label: str,
        poll_interval: float,
        recursive: bool = False,
        polling: bool | None = None,
        rearmed: Callable[[], None] | None = None,
    ) -> None:
        self.dirs, self.pick, self.deliver = set(dirs), pick, deliver
        self.wanted = frozenset(self.dirs)  # what the rearm loop keeps watched
        self.rearmed = rearmed
        # directory -> its watch and the (st_dev, st_ino) it was set on
        self._armed: dict[Path, tuple[ObservedWatch, tuple[int, int]]] = {}
        self._rearm_task: asyncio.Task[None] | None = None
        self.event_filter, self.label, self.poll_interval = event_filter, label, poll_interval
        self.recursive = recursive
        self.polling = polling_forced() if polling is None else polling
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None

    async def start(self) -> None:
        """Watch every directory there is; a missing one is logged, not a reason to poll."""
        later = "watched once it is made" if self.rearmed else "its changes go unseen"
        for missing in sorted(d for d in self.dirs if not d.is_dir()):
            logger.error("cannot watch {}: no such directory; {}", missing, later)
        self.dirs = {d for d in self.dirs if d.is_dir()}
        self._loop = asyncio.get_running_loop()
        self._observer = await asyncio.to_thread(self.observe)
        if self.rearmed is not None:
            self._rearm_task = self._loop.create_task(self._rearm_loop(), name="rearm watch")

    def observe(self) -> BaseObserver:
        """Blocking: a started observer of ``dirs``, inotify unless it must poll."""
        if not self.polling:
            try:
                _pair_moves_quickly()
                return self._started(InotifyObserver(generate_full_events=True))
            except OSError as exc:  # watch or instance limit reached, a filesystem without inotify
                self._warn_polling(exc)
        return self._started(PollingObserver(timeout=self.poll_interval))

    def _warn_polling(self, exc: OSError) -> None:
        if self.label not in _warned:  # once: every program would say the same
            _warned.add(self.label)
            text = "inotify unavailable ({}): watching {} by polling every {}s"
            logger.warning(text, exc, self.label, self.poll_interval)

    def _started(self, observer: BaseObserver) -> BaseObserver:
        try:
            for directory in sorted(self.dirs):
                self._schedule(observer, directory)
            observer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                observer.stop()  # the inotify instance and its thread, if they were made
            raise
        return observer

    def _schedule(self, observer: BaseObserver, directory: Path) -> None:
        filters = self.event_filter
        st = directory.stat()  # before the watch: a later swap shows as a new identity
        watch = observer.schedule(
            self, str(directory), recursive=self.recursive, event_filter=filters
        )
        self._armed[directory] = (watch, (st.st_dev, st.st_ino))

    async def _rearm_loop(self) -> None:
        while True:
            await asyncio.sleep(REARM_INTERVAL)
            if await asyncio.to_thread(self._rearm) and self.rearmed is not None:
                self.rearmed()

    def _rearm(self) -> bool:
        """In a thread: watch again each wanted directory made (again) since its
        watch was set; whether any was."""
        observer, done = self._observer, False
        for directory in sorted(self.wanted):
            try:
                st = directory.stat()
            except OSError:
                continue  # gone (for now): its watch, if any, is dead; wait for it
            armed = self._armed.get(directory)
            if observer is None or (
                armed is not None
                and armed[1] == (st.st_dev, st.st_ino)  # a new directory may reuse the inode:
                and _alive(observer, armed[0])  # the watch of a removed one has ended
            ):
                continue
            try:
                if armed is not None:
                    with contextlib.suppress(KeyError):
                        observer.unschedule(armed[0])
                self._schedule(observer, directory)
            except OSError as exc:
                logger.warning("cannot watch {}: {}", directory, exc)
                continue
            self.dirs.add(directory)
            logger.info("watching {} again", directory)
            done = True
        return done

    def add(self, dirs: Iterable[Path]) -> None:
        """Also watch ``dirs`` (those not watched yet that exist), from now on."""
        for directory in set(dirs) - self.dirs:
            if self._observer is None or not directory.is_dir():
                continue
            try:
                self._schedule(self._observer, directory)
                self.dirs.add(directory)
            except OSError as exc:
                logger.warning("cannot watch {}: {}", directory, exc)

    def on_any_event(self, event: FileSystemEvent) -> None:
        """In watchdog's thread: pick, hand over, nothing else."""
        picked = self.pick(event)
        if picked is not None and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: gosup is exiting
                self._loop.call_soon_threadsafe(self.deliver, picked)

    async def close(self) -> None:
        await cancel_and_wait(self._rearm_task)
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)


def _pair_moves_quickly() -> None:
    """watchdog's inotify emitter holds a rename's IN_MOVED_FROM up to 0.5 s
    to pair it with its IN_MOVED_TO, and its queue's reader sleeps out that
    whole delay when it meets the first half before the second is queued,
    holding every event behind it: the rename of a staged config reached
    gosup 0.5 s late in about one swap of five (bench/config_swap.py, 200
    swaps: p90 475 ms, p99 541; with 20 ms, p90 30 ms, p99 62 under load).
    The kernel queues both halves of one rename together, so 20 ms pairs
    them; a pair missed all the same arrives as a delete and a create, and
    the create of a staged file is acted on after the debounce, not lost.
    Set on the class: gosup's observers are the process's only ones."""
    from watchdog.observers import inotify_move_event_grouper as grouper

    grouper.InotifyMoveEventGrouper.delay = MOVE_PAIRING


def _alive(observer: BaseObserver, watch: ObservedWatch) -> bool:
    """Is the watch still served (watchdog ends it when its directory goes)?"""
    return any(e.watch == watch and e.is_alive() for e in observer.emitters)
