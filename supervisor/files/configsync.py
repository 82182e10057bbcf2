"""Staged config files: watch, verify, validate, swap, judge, roll back.

One ``ConfigSync`` attachment per program with ``config_files``; inside it
one controller per file (``StagedFile``, or ``LiveFile`` for ``staging =
false``), each with its own worker task, so a file is handled one version at
a time and in order (a newer staged version supersedes one still on
probation). The file operations themselves are in ``configswap``, the
validator's and the reload command's runs in ``validator``, the verdict in
``probation``, the last confirmed versions in ``confirmed``.

Watching (the observers themselves are in ``watching``). watchdog observes
the *directories* (a file watch would lose the file at the first rename onto
it) and every event reaches the loop. A rename onto the staging path, or a
write closed on it, is a complete event and is acted on at once: the debounce
adds straight to the deploy latency, so only events that may come from a
writer still at work (created, modified: all that a polling observer can
report) wait for ``DEBOUNCE`` of quiet.

The verdict. After an apply the version is on probation until the program
proves it took it (``probation.py``); failing that, the previous file is
restored and the program reloaded or restarted again. A failure that is an
exit or a liveness restart is decided inside the state listener, during the
program's transition, and the restore is handed to the program as work its
next start waits for (`Program.hold_next_start`): a long-healthy program
that dies on a reload is restarted at once (docs/config.md, `reset_after`),
and a restore that lost that race would let the new run read the bad file
again. The restore itself (hashing the previous version, the renames, the
directory fsyncs) runs in a thread: a slow disk must not hold the loop
(DESIGN §1). Because the program restarts by itself (its restart policy and
backoff), "apply again" after such a rollback needs no signal: its next
start reads the restored file. The crash-loop restore of the last confirmed
version (a hook the Program calls before FATAL) must answer at once whether
it changed anything: it is synchronous, or, while a swap or a rollback
holds the files, handed to the next start the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from watchdog import events as wd

from supervisor.config import ConfigFileSpec
from supervisor.core import spawn
from supervisor.core.program import Program
from supervisor.core.states import ProcessState
from supervisor.core.tasks import cancel_and_wait
from supervisor.files import configswap as swap
from supervisor.files import validator, watching
from supervisor.files.confirmed import Confirmed
from supervisor.files.probation import (
    RELOAD_TIMEOUT,
    SETTLE_MARGIN,
    Abandoned,
    Failure,
    Probation,
    ProberFactory,
    final_check,
)
from supervisor.history import History

S = ProcessState
POLL_INTERVAL = 0.1  # seconds between directory scans of the polling observer
DEBOUNCE = 0.25  # quiet time before acting on an event a writer may still be causing
SIDECAR_GRACE = 1.0  # how long a sidecar naming another file may wait for that file
COMPLETE_EVENTS = frozenset({"moved", "closed"})
# No opened/closed_no_write: every read of the config by the program would wake us.
_EVENT_FILTER = [wd.FileMovedEvent, wd.FileCreatedEvent, wd.FileModifiedEvent, wd.FileClosedEvent]
_EVENT_FILTER += [wd.FileDeletedEvent, wd.DirMovedEvent, wd.DirCreatedEvent, wd.DirDeletedEvent]


def _change(event: wd.FileSystemEvent) -> tuple[str, str, str]:
    """In watchdog's thread: what the controllers look at, (kind, src, dest)."""
    dest = os.fsdecode(event.dest_path) if event.dest_path else ""
    return event.event_type, os.fsdecode(event.src_path), dest


# -- the attachment ------------------------------------------------------------------


class ConfigSync:
    """All config files of one program."""

    holds_autostart = False  # the program starts as usual (an Attachment)

    def __init__(
        self,
        history: History,
        program: Program,
        marks: Mapping[str, str],
        state_dir: Path,
        make_prober: ProberFactory,
        polling: bool | None = None,
    ) -> None:
        self.history = history
        self.program = program
        self.marks = marks  # gosup's marks for the program's validators (spawn.marks)
        self.state_dir = state_dir  # the last confirmed versions live under it
        self.make_prober = make_prober  # confirm and ready probes (health's, wired by app.py)
        self.state_changed = asyncio.Event()
        self.files: list[StagedFile | LiveFile] = [
            StagedFile(self, spec) if spec.staging is not None else LiveFile(self, spec)
            for spec in program.spec.config_files
        ]
        self.watch = watching.Watch(
            {d for f in self.files for d in f.watch_dirs()},
            pick=_change,
            deliver=self.on_event,
            event_filter=_EVENT_FILTER,
            label="config files",
            poll_interval=POLL_INTERVAL,
            polling=polling,
            rearmed=self.rescan,
        )

    def record(self, event: str, **fields: Any) -> None:
        self.history.record(event, self.program.name, **fields)

    async def start(self) -> None:
        self.program.state_listeners.append(self._on_state)
        self.program.before_fatal.append(self._before_fatal)
        await self.watch.start()
        # Before the program's autostart: a version waiting now is the one it starts with.
        for f in self.files:
            await f.start()

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.program.state_listeners.remove(self._on_state)
        with contextlib.suppress(ValueError):
            self.program.before_fatal.remove(self._before_fatal)
        for f in self.files:
            await f.close()
        await self.watch.close()

    def rescan(self) -> None:
        """A directory is watched (again): look at what may have landed unseen."""
        for f in self.files:
            f.kick(complete=True)

    def on_event(self, change: tuple[str, str, str]) -> None:
        for f in self.files:
            f.on_event(*change)

    def _on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
        self.state_changed.set()
        for f in self.files:
            try:
                f.on_state(old, new)
            except Exception as exc:  # never break the program's own transition
                logger.opt(exception=exc).error("{}: rollback: {}", program.name, exc)

    def _before_fatal(self, program: Program) -> bool:
        """About to go FATAL: put back each file's last confirmed version where
        the live one differs; True when one was (one more series of attempts)."""
        restored = False
        for f in self.files:
            try:
                restored = f.restore_confirmed() or restored
            except OSError as exc:
                logger.error("{}: restoring {}: {}", program.name, f.path, exc)
        return restored

    async def state_change(self) -> None:
        """Return at the program's next state change."""
        self.state_changed.clear()
        await self.state_changed.wait()

    async def settled_state(self) -> ProcessState:
        """The program's state once a start under way is over (or has taken too long)."""
        limit = self.program.spec.start_seconds + SETTLE_MARGIN
        if self.program.spec.ready is not None:
            limit = self.program.spec.ready.within + SETTLE_MARGIN
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while self.program.state is S.STARTING:
                    await self.state_change()
        return self.program.state

    async def run_reload_command(self, pid: int) -> validator.Verdict:
        """The program's ``reload_command`` for run ``pid``, in a thread."""
        spec = self.program.spec
        assert spec.reload_command is not None
        env = spawn.child_environment(spec, None, self.marks)
        logger.info("{}: reload command for pid {}", self.program.name, pid)
        return await asyncio.to_thread(
            validator.reload, spec.reload_command, pid, spec.directory, env, RELOAD_TIMEOUT
        )

    async def tell_again(self, spec: ConfigFileSpec) -> None:
        """After a rollback the program still runs: reload or restart it again."""
        if self.program.state is not S.RUNNING:
            return  # its next start reads the restored file
        try:
            again = Probation(self, "", spec.on_change, 0.0)
            failure = await again.tell()
        except Abandoned:
            return
        if failure is not None:
            logger.error("{}: reloading the restored {}: {}", self.program.name, spec.path,
                         failure.detail)  # fmt: skip

    def exit_summary(self) -> str:
        info = self.program.last_exit or {}
        if info.get("signal"):
            return f"signal {info['signal']}"
        return f"exit code {info.get('exit_code')}"


# -- one file ---------------------------------------------------------------------------


class _Controller:
    """What both kinds of file share: a worker woken by events, with a debounce."""

    def __init__(self, sync: ConfigSync, spec: ConfigFileSpec) -> None:
        self.sync = sync
        self.spec = spec
        self.path = spec.path
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._debounce: asyncio.TimerHandle | None = None
        self.trial: Probation | None = None  # the version on probation
        self.confirmed = Confirmed.of(sync.state_dir, sync.program.name, spec.path)
        self._baseline: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"config:{self.sync.program.name}:{self.path.name}"
        )

    async def close(self) -> None:
        if self._debounce is not None:
            self._debounce.cancel()
        await cancel_and_wait(self._baseline, self._task)

    async def check(self) -> None:
        raise NotImplementedError

    def record(self, event: str, **fields: Any) -> None:
        self.sync.record(event, path=str(self.path), **fields)

    def reject(self, reason: str, expected: str | None, actual: str | None, **extra: Any) -> None:
        self.record("config_rejected", reason=reason, expected=expected, actual=actual, **extra)
        logger.warning("{}: {} rejected: {}", self.sync.program.name, self.path, reason)

    def kick(self, complete: bool) -> None:
        """Wake the worker now (complete event) or after DEBOUNCE of quiet."""
        if self._debounce is not None:
            self._debounce.cancel()
            self._debounce = None
        if complete:
            self._wake.set()
        else:
            self._debounce = asyncio.get_running_loop().call_later(DEBOUNCE, self._wake.set)

    async def _run(self) -> None:
        self._wake.set()  # whatever waits already is handled first
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.safe_check()

    async def safe_check(self) -> None:
        try:
            await self.check()
        except Exception as exc:  # a bug or an I/O error: log it, keep watching
            logger.opt(exception=exc).error("{}: config file {}", self.sync.program.name, exc)

    # -- the verdict ----------------------------------------------------------------

    async def judge(self, sha: str) -> None:
        """Keep version ``sha`` on probation until the program confirms it or it
        is rolled back (docs/config-files.md, "The verdict")."""
        name = self.sync.program.name
        trial = Probation(self.sync, sha, self.spec.on_change, self.spec.probation)
        self.trial = trial
        try:
            failure = await trial.run(self.sync.make_prober, self.spec.confirm, self.newer_waiting)
        except Abandoned as exc:
            logger.info("{}: {} (sha256 {}): no verdict: {}", name, self.path, sha[:12], exc)
            return
        finally:
            self.trial = None
        if trial.failure is not None:
            return  # decided, and rolled back, by the state listener
        if failure is None:
            await self.confirm(sha)
        elif await self.roll_back(sha, failure) and not failure.untouched:
            await self.sync.tell_again(self.spec)

    async def newer_waiting(self) -> bool:
        """Whether a newer version supersedes the one on probation (None: never)."""
        await asyncio.Event().wait()
        return False

    def on_state(self, old: ProcessState, new: ProcessState) -> None:
        """From the state listener: an exit or a liveness restart during probation."""
        if self.trial is not None and (failure := self.trial.on_state(old, new)) is not None:
            # off the loop, and before the next start (which reads the file)
            self.sync.program.hold_next_start(self.roll_back(self.trial.sha, failure))
        if new is S.RUNNING and self.trial is None:
            self._schedule_baseline()

    async def confirm(self, sha: str) -> None:
        self.record("config_confirmed", sha256=sha, probation_s=self.spec.probation)
        logger.info("{}: {} confirmed (sha256 {})", self.sync.program.name, self.path, sha[:12])
        try:
            await asyncio.to_thread(self.confirmed.remember, sha)
        except OSError as exc:
            logger.error("{}: keeping the confirmed {}: {}", self.sync.program.name, self.path, exc)

    async def roll_back(self, sha: str, failure: Failure) -> bool:
        """Restore the previous version (True when the program should be told again)."""
        raise NotImplementedError

    def restore_confirmed(self) -> bool:
        """Before FATAL: the last confirmed version back in place, if the live one differs."""
        kept = self.confirmed.sha256()
        current = swap.sha256_or_none(self.path)
        if kept is None or current == kept:
            return False
        self.record(
            "config_rolled_back", sha256=current, restored_sha256=kept, reason="crash_loop",
            detail="the program is crash-looping: back to the last confirmed version",
        )  # fmt: skip
        logger.warning(
            "{}: crash loop: restoring the confirmed {}", self.sync.program.name, self.path
        )
        if self.confirmed.restore() is None:
            logger.error("{}: the kept version of {} is damaged", self.sync.program.name, self.path)
            return False
        self.restored(kept)
        return True

    def restored(self, sha: str) -> None:
        """The live file is ``sha`` again (gosup put it back)."""

    def _schedule_baseline(self) -> None:
        """A run that stays up ``probation`` (and passes confirm and ready) confirms
        the version it started with, when it is not the last confirmed one yet."""
        if self._baseline is not None:
            self._baseline.cancel()
        pid = self.sync.program.pid
        self._baseline = asyncio.get_running_loop().create_task(self._confirm_baseline(pid))

    async def _confirm_baseline(self, pid: int | None) -> None:
        program = self.sync.program
        await asyncio.sleep(self.spec.probation)
        if self.trial is not None or program.pid != pid or program.state is not S.RUNNING:
            return
        live = await asyncio.to_thread(swap.sha256_or_none, self.path)
        kept = await asyncio.to_thread(self.confirmed.sha256)
        if live is None or live == kept:
            return
        for spec in (self.spec.confirm, program.spec.ready):
            if spec is None:
                continue
            prober = self.sync.make_prober(spec, program.spec)
            try:
                if await final_check(prober, spec) is not None:
                    return
            finally:
                await prober.aclose()
        if self.trial is None and program.pid == pid and program.state is S.RUNNING:
            await self.confirm(live)

    async def validate(self, file: Path) -> validator.Verdict:
        program = self.sync.program.spec
        assert self.spec.validate is not None
        env = spawn.child_environment(program, None, self.sync.marks)
        argv, timeout = self.spec.validate, self.spec.validate_timeout
        return await asyncio.to_thread(
            validator.validate, argv, file, program.directory, env, timeout
        )


class StagedFile(_Controller):
    """A file that deployers hand over at ``staging`` (with its ``.sha256`` sidecar)."""

    def __init__(self, sync: ConfigSync, spec: ConfigFileSpec) -> None:
        super().__init__(sync, spec)
        assert spec.staging is not None
        self.staging = spec.staging
        self.sidecar = swap.sidecar_of(spec.staging)
        # The directory as watched: inotify reports nothing on a symlink to one.
        self.watched_staging = _resolved_dir(spec.staging.parent) / spec.staging.name
        self.live_sha: str | None = None
        # A swap (the worker) and a rollback (handed over by the state listener)
        # must never interleave their renames: each holds this while its thread works.
        self._files_lock = asyncio.Lock()
        self._sidecar_timers: set[asyncio.TimerHandle] = set()

    def watch_dirs(self) -> set[Path]:
        return {self.watched_staging.parent}

    async def close(self) -> None:
        for timer in self._sidecar_timers:
            timer.cancel()
        self._sidecar_timers.clear()
        await super().close()

    async def start(self) -> None:
        name = self.sync.program.name
        try:  # a config file's trouble must never keep gosup or the program from starting
            self.live_sha = await asyncio.to_thread(swap.sha256_or_none, self.path)
            if await asyncio.to_thread(swap.recover, self.staging):
                logger.warning("{}: re-checking {} (gosup died applying it)", name, self.staging)
            await asyncio.to_thread(self._drop_applied_sidecar)
        except OSError as exc:
            logger.error("{}: config file {}: {}", name, self.path, exc)
        await self.safe_check()  # a version staged while gosup was down
        await super().start()

    def _drop_applied_sidecar(self) -> None:
        """A gosup killed between a swap and the sidecar's removal left it: drop it."""
        with contextlib.suppress(swap.Refused):  # a bad one is refused with the next version
            sidecar = swap.read_sidecar(self.sidecar)
            if sidecar and sidecar.sha256 == self.live_sha and not self.staging.exists():
                swap.consume_sidecar(self.sidecar, sidecar.text)

    def on_event(self, kind: str, src: str, dest: str) -> None:
        staging = str(self.watched_staging)
        if (kind == "moved" and dest == staging) or (kind == "closed" and src == staging):
            self.kick(complete=True)
        elif kind in ("created", "modified") and src == staging:
            self.kick(complete=False)

    async def check(self) -> None:
        """Handle every version on the staging path, one claim at a time."""
        while (claimed := await asyncio.to_thread(self._claim)) is not None:
            await self._handle(claimed)

    def _claim(self) -> _Claimed | None:
        """In a thread: the staged file taken aside and looked at (never blocking,
        never following a link, never reading more than a bounded size)."""
        work = swap.claim(self.staging)
        if work is None:
            return None
        staged: swap.Staged | None = None
        sidecar: swap.Sidecar | None = None
        refused: swap.Refused | None = None
        try:
            staged = swap.inspect_staged(work)
        except (swap.Refused, OSError) as exc:  # OSError: gone, or the disk failed
            refused = _as_refused(exc, "the staged file")
        try:
            sidecar = swap.read_sidecar(self.sidecar)
        except (swap.Refused, OSError) as exc:
            sidecar = swap.Sidecar(None, None)  # consumed like any, once its file is dealt with
            refused = refused or _as_refused(exc, "the sidecar")
        return _Claimed(work, staged, sidecar, refused)

    async def _handle(self, claimed: _Claimed) -> None:
        """Every claimed version ends in a record: applied or rejected."""
        work, staged, sidecar = claimed.work, claimed.staged, claimed.sidecar
        actual = staged.sha256 if staged else None
        expected = sidecar.sha256 if sidecar else None
        if claimed.refused is not None or staged is None:
            refused = claimed.refused or swap.Refused("unreadable", "the staged file")
            await self._reject(work, refused.reason, expected, actual, sidecar, error=refused.error)
            return
        if sidecar is None or sidecar.sha256 is None:
            await self._reject(work, "missing_checksum", None, actual, sidecar)
            return
        if sidecar.sha256 != actual:
            await self._reject(work, "checksum_mismatch", sidecar.sha256, actual, None)
            self._sidecar_may_be_for_next(sidecar)
            return
        if self.spec.validate is not None:
            verdict = await self.validate(work)
            if not verdict.ok:
                said = {"exit_code": verdict.exit_code, "output_tail": verdict.output_tail}
                await self._reject(work, "validation_failed", expected, actual, sidecar, **said)
                return
        await self._install(work, staged, sidecar)

    async def _reject(
        self,
        work: Path,
        reason: str,
        expected: str | None,
        actual: str | None,
        sidecar: swap.Sidecar | None,
        **extra: Any,
    ) -> None:
        self.reject(reason, expected, actual, **extra)
        with contextlib.suppress(FileNotFoundError):  # it may have vanished while checked
            await asyncio.to_thread(swap.set_aside, work, swap.rejected_of(self.staging))
        if sidecar is not None:  # consumed with its file, never before it is dealt with
            await asyncio.to_thread(swap.consume_sidecar, self.sidecar, sidecar.text)

    def _sidecar_may_be_for_next(self, sidecar: swap.Sidecar) -> None:
        """A sidecar naming another hash may belong to a version about to land (its
        deployer writes the sidecar before renaming the file): it gets SIDECAR_GRACE
        to show up, then the sidecar is consumed so it cannot vouch for anything later."""

        def drop() -> None:
            self._sidecar_timers.discard(timer)
            if not self.staging.exists() and not swap.work_of(self.staging).exists():
                swap.consume_sidecar(self.sidecar, sidecar.text)

        timer = asyncio.get_running_loop().call_later(SIDECAR_GRACE, drop)
        self._sidecar_timers.add(timer)

    async def _install(self, work: Path, staged: swap.Staged, sidecar: swap.Sidecar) -> None:
        previous, sha = self.live_sha, staged.sha256
        name = self.sync.program.name
        if sha == previous:  # nothing changes for the program: no swap, no probation
            await asyncio.to_thread(work.unlink)
            await asyncio.to_thread(swap.consume_sidecar, self.sidecar, sidecar.text)
            self.record("config_applied", sha256=sha, previous_sha256=previous, unchanged=True)
            return
        try:
            async with self._files_lock:
                await asyncio.to_thread(self._install_files, work, staged, sidecar)
        except swap.Refused as exc:  # the deployer swapped the claimed file meanwhile
            await self._reject(work, exc.reason, sha, None, sidecar, error=exc.error)
            return
        except OSError as exc:  # read-only target, disk full: the live file is untouched
            await self._reject(work, "install_failed", sha, sha, sidecar, error=str(exc))
            return
        self.record("config_applied", sha256=sha, previous_sha256=previous)
        logger.info("{}: applied {} (sha256 {})", name, self.path, sha[:12])
        await self.judge(sha)

    def _install_files(self, work: Path, staged: swap.Staged, sidecar: swap.Sidecar) -> None:
        """In a thread, under the files lock: the swap, then the sidecar."""
        swap.install(work, self.path, staged.identity)
        self.live_sha = staged.sha256
        swap.consume_sidecar(self.sidecar, sidecar.text)  # only once its file is live

    async def newer_waiting(self) -> bool:
        """Woken with a file on the staging path: a newer version supersedes this one."""
        await self._wake.wait()
        if await asyncio.to_thread(self.staging.exists):
            return True  # the worker stays woken and claims it next
        self._wake.clear()
        return False

    async def roll_back(self, sha: str, failure: Failure) -> bool:
        name = self.sync.program.name
        async with self._files_lock:
            if self.live_sha != sha:
                return False  # already replaced by a newer version: nothing to take back
            prev = swap.prev_of(self.path)
            restored = await asyncio.to_thread(swap.sha256_or_none, prev)
            missing = {} if restored else {"error": f"no previous version at {prev}"}
            self.record(
                "config_rolled_back", sha256=sha, restored_sha256=restored,
                reason=failure.reason, detail=failure.detail, **failure.extra, **missing,
            )  # fmt: skip
            logger.warning("{}: {} ({}): rolling back {}", name, failure.reason, failure.detail,
                           self.path)  # fmt: skip
            try:
                await asyncio.to_thread(swap.restore, self.path)
            except OSError as exc:
                logger.error("{}: rollback of {} failed: {}", name, self.path, exc)
                return False
            self.live_sha = restored
        return True

    def restore_confirmed(self) -> bool:
        if not self._files_lock.locked():
            return super().restore_confirmed()
        # A swap or a rollback holds the files (its thread is at work): the
        # confirmed version goes back once it is done, before the next start.
        self.sync.program.hold_next_start(self._restore_confirmed_after())
        return True

    async def _restore_confirmed_after(self) -> None:
        async with self._files_lock:
            try:
                super().restore_confirmed()
            except OSError as exc:
                logger.error("{}: restoring {}: {}", self.sync.program.name, self.path, exc)

    def restored(self, sha: str) -> None:
        self.live_sha = sha


class LiveFile(_Controller):
    """``staging = false``: the live file itself is watched (edited in place, or a
    Kubernetes ConfigMap whose ``..data`` symlink is swapped). Changes are told
    apart by content and judged like staged ones; gosup does not own this file,
    so a failed verdict does not roll it back: only a crash loop brings the last
    confirmed version back (``restore_confirmed``)."""

    def __init__(self, sync: ConfigSync, spec: ConfigFileSpec) -> None:
        super().__init__(sync, spec)
        self.applied_sha: str | None = None
        self.rejected_sha: str | None = None

    def watch_dirs(self) -> set[Path]:
        return {_resolved_dir(self.path.parent), _resolved_dir(swap.live_target(self.path).parent)}

    async def start(self) -> None:
        try:  # as for staged files: a config file's trouble never stops the program
            self.applied_sha = await asyncio.to_thread(swap.sha256_or_none, self.path)
        except OSError as exc:
            logger.error("{}: config file {}: {}", self.sync.program.name, self.path, exc)
        await super().start()

    def on_event(self, kind: str, src: str, dest: str) -> None:
        # Any change in these directories may be ours (a ConfigMap swaps a link
        # two levels up); hashing one config file is cheap enough to just look.
        self.kick(complete=kind in COMPLETE_EVENTS)

    async def check(self) -> None:
        self.sync.watch.add(self.watch_dirs())  # a ConfigMap's target may have moved
        sha = await asyncio.to_thread(swap.sha256_or_none, self.path)
        if sha is None or sha in (self.applied_sha, self.rejected_sha):
            return
        if self.spec.validate is not None:
            verdict = await self.validate(self.path)
            if not verdict.ok:
                self.rejected_sha = sha
                said = {"exit_code": verdict.exit_code, "output_tail": verdict.output_tail}
                self.reject("validation_failed", None, sha, **said)
                return
        previous, self.applied_sha = self.applied_sha, sha
        self.record("config_applied", sha256=sha, previous_sha256=previous)
        await self.judge(sha)

    async def newer_waiting(self) -> bool:
        """Woken while a version is on probation: the live file changed again?"""
        await self._wake.wait()
        sha = await asyncio.to_thread(swap.sha256_or_none, self.path)
        if sha is not None and sha != self.applied_sha:
            return True  # the worker stays woken and looks at it next
        self._wake.clear()
        return False

    async def roll_back(self, sha: str, failure: Failure) -> bool:
        logger.warning(
            "{}: {} failed its verdict ({}: {}); gosup does not own that file (staging = "
            "false): the last confirmed version comes back only if the program crash-loops",
            self.sync.program.name, self.path, failure.reason, failure.detail,
        )  # fmt: skip
        return False

    def restored(self, sha: str) -> None:
        self.applied_sha = sha


@dataclass(frozen=True)
class _Claimed:
    """A staged version taken aside, as first seen: ``refused`` is the first
    reason not to use it (the file's own before its sidecar's)."""

    work: Path
    staged: swap.Staged | None
    sidecar: swap.Sidecar | None
    refused: swap.Refused | None


def _as_refused(exc: Exception, what: str) -> swap.Refused:
    if isinstance(exc, swap.Refused):
        return exc
    return swap.Refused("unreadable", f"{what}: {exc}")


def _resolved_dir(directory: Path) -> Path:
    """The real directory behind ``directory`` (watchdog's inotify observer does
    not follow a symlinked directory: it would report nothing)."""
    return Path(os.path.realpath(directory))
