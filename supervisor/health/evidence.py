"""Evidence: goroutine dumps and heap profiles, kept on disk for a person.

Dumps are written under ``<state_dir>/dumps/`` as
``<program>-<UTC stamp>-<kind>.<ext>``, capped in size, the oldest pruned.
They come three ways: fetched over pprof (a leak with ``evidence = "pprof"``,
or ``gosup dump``), or captured from stderr when the Go runtime answers a
SIGQUIT (a leak with ``evidence = "sigquit"``; see `SigquitCapture`).
Every saved dump is an ``evidence_saved`` record in the history, but only
once it was read back and found to hold goroutine stacks: a program that
traps SIGQUIT (caddy does) answers it with a log line, a pprof endpoint
behind a proxy may answer a login page, and recording those as evidence
would tell the operator the hang is documented when it is not. They are
``evidence_failed`` with a glimpse of what came, like a dump that could not
be fetched.

Writing a dump, reading it back and pruning the oldest are disk work that
can stall (DESIGN §1): they run in gosup's disk threads (`core/offload.py`),
never on the loop. A SIGQUIT dump is written once its run is over and must
be recorded before the next start: the Program's next start waits for it
(`Program.hold_next_start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from supervisor.config import LimitsSpec
from supervisor.core.lines import Head
from supervisor.core.offload import DISK
from supervisor.core.program import Program, Restart
from supervisor.core.states import ProcessState
from supervisor.health.gohttp import ScrapeError, http_get
from supervisor.history import History
from supervisor.protocol import RequestError

GOROUTINE_DUMP_PATH = "/debug/pprof/goroutine?debug=2"
HEAP_PROFILE_PATH = "/debug/pprof/heap"
DUMP_TIMEOUT = 10.0  # a goroutine dump of a big program takes a while to write
TRUNCATED_NOTE = b"\n\n[gosup: dump truncated at dump_max_size]\n"
DUMPABLE_STATES = frozenset({ProcessState.STARTING, ProcessState.RUNNING})

# What the Go runtime writes for every goroutine, in a SIGQUIT dump and in
# pprof's debug=2 text: "goroutine 1 [running]:", or with GOTRACEBACK=system
# "goroutine 0 gp=0xb2e700 m=0 mp=0xb2f8e0 [idle]:" (debug=1 starts "goroutine profile:").
_STACKS = re.compile(rb"^goroutine (\d+ [^\n]*\[[^\n]*\]:|profile: total )", re.MULTILINE)
GOROUTINE_KINDS = frozenset({"pprof", "sigquit"})  # the kinds that must hold stacks
GLIMPSE = 160  # bytes of a non-dump quoted in evidence_failed

_DUMP_NAME = re.compile(r"^(?P<program>.+)-(?P<stamp>\d{8}T\d{6}\.\d{3}Z(?:\.\d+)?)-[a-z_]+\.")


# -- files -------------------------------------------------------------------------


def dump_stem(dumps_dir: Path, program: str) -> str:
    """A fresh ``<program>-<stamp>`` for one dump's files (unique even within one ms)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    stem, n = f"{program}-{stamp}", 1
    while any(dumps_dir.glob(f"{stem}-*")):
        n += 1
        stem = f"{program}-{stamp}.{n}"
    return stem


def write_dump(path: Path, data: bytes, max_size: int, truncated: bool = False) -> Path:
    """Write a dump atomically (0600), cut to ``max_size`` bytes with a note when longer."""
    if len(data) > max_size or truncated:
        data = data[: max(0, max_size - len(TRUNCATED_NOTE))]
        if not path.name.endswith(".gz"):  # a note would corrupt a binary profile
            data += TRUNCATED_NOTE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)
    return path


def prune_dumps(dumps_dir: Path, program: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` dumps of ``program`` (a dump = files of one stem)."""
    stems: dict[str, list[Path]] = {}
    try:
        names = list(dumps_dir.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []  # no dumps yet (or dumps/ unusable, which writing them reports)
    for path in names:
        match = _DUMP_NAME.match(path.name)
        if match is not None and match["program"] == program:
            stems.setdefault(f"{match['program']}-{match['stamp']}", []).append(path)
    removed = []
    for stem in sorted(stems, key=_stamp_order)[:-keep]:
        for path in stems[stem]:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:  # not ours to remove: leave it, prune the rest
                logger.warning("dumps: cannot remove {}: {}", path, exc)
                continue
            removed.append(path)
    return removed


def _stamp_order(stem: str) -> tuple[str, int]:
    match = re.search(r"-(\d{8}T\d{6}\.\d{3}Z)(?:\.(\d+))?$", stem)
    return (match[1], int(match[2] or 1)) if match else ("", 0)


def holds_stacks(data: bytes) -> bool:
    return _STACKS.search(data) is not None


def verdict(path: Path, kind: str) -> str | None:
    """None when ``path`` is evidence of ``kind``; else what was received instead."""
    if kind not in GOROUTINE_KINDS:
        return None  # a heap profile is binary: its size is the check
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read it back: {exc.strerror or exc}"
    if holds_stacks(data):
        return None
    glimpse = data.strip()[:GLIMPSE].decode("utf-8", "replace")
    return f"no goroutine stacks in the {len(data)} bytes received: {glimpse!r}"


# -- over pprof --------------------------------------------------------------------


def pprof_url(go_metrics: str, path: str) -> str:
    """``path`` (with its query) on the host:port of the go_metrics URL."""
    parts = urlsplit(go_metrics)
    return f"{parts.scheme}://{parts.netloc}{path}"


async def fetch_dump(url: str, path: Path, max_size: int, timeout: float) -> Path:
    """Save what ``url`` answers (a pprof profile) at ``path``; ScrapeError on failure."""
    response = await http_get(url, timeout, max_size)
    if response.status != 200:
        raise ScrapeError(f"{url}: HTTP {response.status}")
    return await DISK.run(write_dump, path, response.body, max_size, response.truncated)


# -- from stderr, after a SIGQUIT -------------------------------------------------------


def goroutine_traces(stderr: bytes) -> bytes:
    """The SIGQUIT dump in a captured stretch of stderr (what the runtime wrote from
    its ``SIGQUIT: quit`` header on), or everything when the header is not there."""
    start = stderr.find(b"SIGQUIT: quit")
    return stderr[start:] if start >= 0 else stderr


class SigquitCapture:
    """A run's stderr from now until the run is over, saved as a goroutine dump
    when gosup stopped that run with SIGQUIT.

    ``feed`` is a tap on the program's stderr (`Program.tap_stderr`). When
    `Program.exited` is resolved the child is gone and its output drained, so
    everything the runtime wrote has passed the tap: ``wanted`` says whether
    that run ended by gosup's SIGQUIT, and ``save`` writes the dump (in a
    disk thread) and hands it to ``on_saved``. The caller makes the next
    start wait for ``save``, so ``evidence_saved`` precedes the next
    ``started`` in the history. A run that ended any other way (the restart
    was refused: no SIGQUIT went out) leaves no dump.
    """

    def __init__(
        self,
        program: str,
        path: Path,
        max_size: int,
        on_saved: Callable[[Path], Awaitable[object]],
    ) -> None:
        self.program, self.path, self.max_size, self.on_saved = program, path, max_size, on_saved
        self.head = Head(max_size)
        self.feed = self.head.feed

    @staticmethod
    def wanted(ended: asyncio.Future[int | None]) -> bool:
        """Whether the run ended by the SIGQUIT gosup sent (its stderr is a dump)."""
        return not ended.cancelled() and ended.result() == signal.SIGQUIT

    async def save(self) -> None:
        traces = goroutine_traces(bytes(self.head.data))
        if not traces.strip():
            logger.warning("{}: SIGQUIT produced no goroutine dump", self.program)
            return
        try:
            path = await DISK.run(write_dump, self.path, traces, self.max_size, self.head.truncated)
        except OSError as exc:
            logger.warning("{}: cannot save the SIGQUIT dump: {}", self.program, exc)
            return
        await self.on_saved(path)


# -- the dumps directory -------------------------------------------------------------


class Dumps:
    """One supervisor's dumps directory: names, fetches, records and prunes."""

    def __init__(self, history: History, dumps_dir: Path) -> None:
        self.history = history
        self.dir = dumps_dir

    def path(self, program: str, suffix: str) -> Path:
        """A fresh path for one file of a new dump of ``program``."""
        return self.dir / f"{dump_stem(self.dir, program)}-{suffix}"

    async def saved(
        self, program: Program, limits: LimitsSpec, path: Path, kind: str, **extra: Any
    ) -> None:
        """Record a saved dump (``evidence_saved``) and prune the oldest."""
        await self.record(program.name, path, kind, limits.dump_keep, **extra)

    async def record(self, program: str, path: Path, kind: str, keep: int, **extra: Any) -> bool:
        """``evidence_saved`` for a real dump (True), then prune to ``keep``; else
        ``evidence_failed`` and the file goes (a non-dump must not push a real
        one out of dump_keep). The read-back and the pruning run in a disk thread."""
        error = await DISK.run(verdict, path, kind)
        if error is not None:
            self.failed(program, kind, error)
            with contextlib.suppress(OSError):
                await DISK.run(path.unlink)
            return False
        self.history.record("evidence_saved", program, path=str(path), kind=kind, **extra)
        logger.info("{}: {} evidence saved to {}", program, kind, path)
        await DISK.run(prune_dumps, self.dir, program, keep)
        return True

    def failed(self, program: str, kind: str, error: str) -> None:
        """``evidence_failed``: no dump of ``kind``, and why."""
        self.history.record("evidence_failed", program, kind=kind, error=error)
        logger.warning("{}: no {} evidence: {}", program, kind, error)

    async def pprof(self, program: Program, limits: LimitsSpec) -> None:
        """A goroutine dump and a heap profile over pprof, both at once: an
        overloaded program delays its restart DUMP_TIMEOUT at most. A dump that
        cannot be read or written is logged: the evidence is a bonus, the
        restart must happen all the same."""
        if limits.go_metrics is None:
            logger.info("{}: no go_metrics URL: no pprof evidence", program.name)
            return
        stem = dump_stem(self.dir, program.name)
        wanted = (
            (GOROUTINE_DUMP_PATH, "pprof", "goroutines.txt"),
            (HEAP_PROFILE_PATH, "pprof_heap", "heap.pb.gz"),
        )
        fetched = await asyncio.gather(
            *(
                fetch_dump(
                    pprof_url(limits.go_metrics, path),
                    self.dir / f"{stem}-{suffix}",
                    limits.dump_max_size,
                    DUMP_TIMEOUT,
                )
                for path, _, suffix in wanted
            ),
            return_exceptions=True,
        )
        for (_, kind, _), result in zip(wanted, fetched, strict=True):
            if isinstance(result, ScrapeError | OSError):
                self.failed(program.name, kind, str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                await self.saved(program, limits, result, kind)

    async def on_request(self, program: Program) -> dict[str, Any]:
        """``gosup dump``: a goroutine dump now, over pprof (the process keeps running)."""
        name, limits = program.name, program.spec.limits
        if limits is None or limits.go_metrics is None:
            raise RequestError(
                f"{name} has no go_metrics URL: set [programs.{name}.limits] go_metrics "
                "(the dump is read from /debug/pprof/goroutine on its host:port)"
            )
        if program.state not in DUMPABLE_STATES:
            raise RequestError(f"{name} is not running ({program.state.value})")
        try:
            path = await self.fetch_goroutines(name, limits.go_metrics, limits, DUMP_TIMEOUT)
        except ScrapeError as exc:
            raise RequestError(f"dump {name}: {exc}") from None
        await self.saved(program, limits, path, "pprof", reason="operator")
        return {"path": str(path)}

    async def fetch_goroutines(
        self, program: str, go_metrics: str, limits: LimitsSpec, timeout: float
    ) -> Path:
        """A goroutine dump (pprof debug=2) saved under a fresh name; ScrapeError
        or OSError when it cannot be fetched or written. Not yet recorded."""
        url = pprof_url(go_metrics, GOROUTINE_DUMP_PATH)
        path = self.path(program, "goroutines.txt")
        return await fetch_dump(url, path, limits.dump_max_size, timeout)

    async def restart_with_sigquit(
        self, program: Program, pid: int, reason: str, /, **extra: Any
    ) -> None:
        """`restart_with_sigquit`, its stderr saved as a ``sigquit`` dump (recorded
        with ``extra``) under the program's dump_max_size and dump_keep."""
        limits = program.spec.limits or LimitsSpec()
        capture = SigquitCapture(
            program.name,
            self.path(program.name, "sigquit.txt"),
            limits.dump_max_size,
            lambda path: self.saved(program, limits, path, "sigquit", **extra),
        )
        await restart_with_sigquit(program, pid, reason, capture)


async def restart_with_sigquit(
    program: Program, pid: int, reason: str, capture: SigquitCapture
) -> None:
    """Restart ``program``'s run ``pid`` with SIGQUIT as its stop signal: the Go
    runtime writes every goroutine's stack to stderr on the way out, and the
    program's task sees a requested stop, not a crash. ``capture`` taps that
    stderr and saves it once the run is over, before the next start."""
    untap = program.tap_stderr(capture.feed)
    ended = program.exited(pid)

    def run_ended(ended: asyncio.Future[int | None]) -> None:
        if capture.wanted(ended):
            program.hold_next_start(capture.save())

    ended.add_done_callback(run_ended)
    try:
        await program.request(Restart(reason=reason, stop_signal=signal.SIGQUIT, pid=pid))
    finally:
        untap()
        ended.cancel()  # refused: no SIGQUIT went out, whatever ends that run is no dump
