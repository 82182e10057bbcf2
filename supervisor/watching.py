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
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

T = TypeVar("T")
FORCE_POLLING_ENV = "GOSUP_FORCE_POLLING"
EventFilter = list[type[FileSystemEvent]]
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
    ) -> None:
        self.dirs, self.pick, self.deliver = set(dirs), pick, deliver
        self.event_filter, self.label, self.poll_interval = event_filter, label, poll_interval
        self.recursive = recursive
        self.polling = polling_forced() if polling is None else polling
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None

    async def start(self) -> None:
        """Watch every directory there is; a missing one is logged, not a reason to poll."""
        for missing in sorted(d for d in self.dirs if not d.is_dir()):
            logger.error("cannot watch {}: no such directory; its changes go unseen", missing)
        self.dirs = {d for d in self.dirs if d.is_dir()}
        self._loop = asyncio.get_running_loop()
        self._observer = await asyncio.to_thread(self.observe)

    def observe(self) -> BaseObserver:
        """Blocking: a started observer of ``dirs``, inotify unless it must poll."""
        if not self.polling:
            try:
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
        observer.schedule(self, str(directory), recursive=self.recursive, event_filter=filters)

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
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            await asyncio.to_thread(observer.join, 5.0)
