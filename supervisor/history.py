"""The history: every decision gosup takes, one JSON object per line.

`<state_dir>/history.jsonl` is what operators trust (docs/history.md), so a record
is handed to the kernel before the action it describes: each one is written
with a single unbuffered `write()` on a file opened for appending, so a
reader (`gosup history -f`, `tail -f`) never sees half a record unless the
machine dies mid-write, and then only the last line, which readers skip.

Writing never fails the caller. The caller is a program in the middle of a
transition, and a full or failing disk must degrade the history, never
supervision: a record that cannot be written (ENOSPC, EIO, the directory
gone and not re-creatable) is counted (``History.write_errors``), reported
once per burst, and kept in a bounded backlog that is written, in order,
before the next record once writing works again. A short write is completed
or cut back to the start of its line, so a torn line can never swallow the
next record. The file is reopened when it was renamed (logrotate) or
deleted under us, and rotated at ``max_size`` keeping ``backups`` files
(``history.jsonl.1`` the newest of them).

This module is the writer (`History`), the record names and the one way to
read the files (`Last`, `Tail`); formatting for humans is the
command line's (`supervisor/cli/historyview.py`). Reading the last N
records costs what is printed, not the size of the history: the files are
read backwards in blocks, at most ``scan_limit`` bytes of them, and then
streamed forwards from where the first wanted record starts. Stdlib only:
the CLI imports it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

EVENT_NAMES: frozenset[str] = frozenset(
    {
        "started",
        "running",
        "exited",
        "backoff",
        "fatal",
        "stopping",
        "stopped",
        "limit_exceeded",
        "evidence_saved",
        "evidence_failed",
        "probe_failed",
        "restart_requested",
        "restart_failed",
        "config_applied",
        "config_confirmed",
        "config_rejected",
        "config_rolled_back",
        "signal_sent",
        "build_started",
        "build_succeeded",
        "build_failed",
        "supervisor_started",
        "supervisor_reloaded",
        "supervisor_stopped",
        "supervisor_lost",
    }
)

DEFAULT_MAX_SIZE = 64 * 1024**2  # [supervisor] history_max_size
DEFAULT_BACKUPS = 5  # [supervisor] history_backups
SCAN_LIMIT = 64 * 1024**2  # bytes a reader of the last N records looks back through, at most
BACKLOG_MAX = 1000  # records held in memory while the file cannot be written
FILE_MODE = 0o640
BLOCK = 64 * 1024

Record = dict[str, Any]
Listener = Callable[[dict[str, object]], None]


def now_rfc3339() -> str:
    """Wall-clock time for stamping records: "2026-11-26T23:48:48.123Z"."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Values that read back from JSON as they are: a record of only these is not
# parsed again for its listeners (most records; a crash loop writes three a run).
_PLAIN = frozenset({str, int, float, bool, type(None)})


def _json_default(value: object) -> object:
    # Crash and similar records know their own JSON shape; anything else
    # (Path, enum members) is written as its string form.
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


# One encoder for every record (json.dumps with options makes one a call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_json_default)


def backup_path(path: Path, index: int) -> Path:
    """``history.jsonl.1`` (the newest backup), ``.2`` ..."""
    return path.with_name(f"{path.name}.{index}")


class History:
    """Append-only JSON-lines writer with rotation.

    `record()` writes before returning, so the record is with the OS before
    the action it describes. Call it from one thread (the loop).
    ``on_write_error`` hears, as one sentence, that writing started failing
    and that it works again (one message per burst, not one per record).
    """

    def __init__(
        self,
        path: Path,
        on_listener_error: Callable[[BaseException], None] | None = None,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        backups: int = DEFAULT_BACKUPS,
        on_write_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.max_size = max_size
        self.backups = backups
        # A listener (log line, metrics, a control client following the
        # history) must never cost us a record: its errors are counted and
        # passed to on_listener_error, never raised.
        self.on_listener_error = on_listener_error
        self.on_write_error = on_write_error
        self.listener_errors = 0
        self.write_errors = 0  # failed attempts to write a record (exported as a metric)
        self.dropped = 0  # records lost because the backlog was full
        self._listeners: list[Listener] = []
        self._backlog: collections.deque[bytes] = collections.deque()
        self._failing = False
        self._torn = False  # a cut-back failed: the file may end in half a line
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._open()  # at start a history we cannot open is an error, not a degradation

    def record(self, event: str, program: str | None = None, **fields: object) -> dict[str, object]:
        """Write one record, tell the listeners, and return it.

        The returned dict (and what listeners get) is the record as a reader
        of the file will see it: Crash objects become dicts, paths strings.
        A failed write is counted and reported, never raised.
        """
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown history event {event!r}")
        if "ts" in fields:
            raise ValueError("'ts' is set by History.record()")
        head: dict[str, object] = {"ts": now_rfc3339()}
        if program is not None:
            head["program"] = program
        head["event"] = event
        rec: dict[str, object] = head | fields
        line = _ENCODER.encode(rec)
        self._append((line + "\n").encode())
        if not all(type(value) in _PLAIN for value in fields.values()):
            rec = json.loads(line)  # as a reader will see it: Crash -> dict, Path -> str
        self._notify(rec)
        return rec

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    @property
    def pending(self) -> int:
        """Records written to memory only, waiting for the file to take them."""
        return len(self._backlog)

    def close(self) -> None:
        if self._backlog:
            self._append(b"")  # a last try for what waits in memory
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------

    def _append(self, data: bytes) -> None:
        if data:
            self._backlog.append(data)
        try:
            self._check_file()
            while self._backlog:
                line = self._backlog[0]
                if self._size and self._size + len(line) > self.max_size:
                    self._rotate()
                self._write_line(line)
                self._backlog.popleft()
        except OSError as exc:
            self.write_errors += 1
            while len(self._backlog) > BACKLOG_MAX:
                self._backlog.popleft()
                self.dropped += 1
            if not self._failing:
                self._failing = True
                self._report(
                    f"cannot write the history {self.path}: {exc}; records wait in memory "
                    f"(up to {BACKLOG_MAX}) until it can be written again"
                )
            return
        if self._failing:
            self._failing = False
            lost = f", {self.dropped} records lost in all" if self.dropped else ""
            self._report(
                f"the history {self.path} is written again ({self.write_errors} failed "
                f"writes in all{lost})"
            )

    def _write_line(self, line: bytes) -> None:
        """One ``os.write`` of the whole line; a short write is completed, and a
        failure part-way cuts the file back to where the line began."""
        assert self._fd is not None
        if self._torn:  # end the half line a failed cut-back left, so readers skip it
            self._size += os.write(self._fd, b"\n")
            self._torn = False
        written = 0
        try:
            while written < len(line):
                n = os.write(self._fd, line[written:])
                if n <= 0:
                    raise OSError(28, "no space left on device (short write)")
                written += n
        except OSError:
            if written:
                self._cut_back(written)
            raise
        self._size += written

    def _cut_back(self, written: int) -> None:
        assert self._fd is not None
        try:
            size = os.fstat(self._fd).st_size
            os.ftruncate(self._fd, size - written)
            self._size = size - written
        except OSError:
            self._torn = True

    def _check_file(self) -> None:
        """Reopen the file when it was renamed or deleted under us (logrotate,
        rm, a deleted state_dir) or is not open since a failure."""
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    return
            except FileNotFoundError:
                pass
            self._close_fd()
        self._open()

    def _open(self) -> None:
        from supervisor import fileops  # (the writer's: not on `gosup history`'s path)

        # mode only applies to the last component; parents get the umask default.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # What a killed gosup's rotation left to delete (once per directory and gosup).
        fileops.sweep_discarded(self.path.parent, self._report)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = os.open(self.path, flags, FILE_MODE)
        st = os.fstat(fd)
        self._fd, self._identity, self._size = fd, (st.st_dev, st.st_ino), st.st_size
        self._torn = False

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None

    def _rotate(self) -> None:
        """history.jsonl -> .1 -> .2 ... keeping ``backups`` files. What goes
        is discarded (``fileops.discard``): no rename here lands on a file, so
        none frees blocks on the loop (a history file is up to
        history_max_size, 64 MiB by default)."""
        from supervisor import fileops

        self._close_fd()
        extra = self.backups + 1
        while backup_path(self.path, extra).exists():  # from a larger history_backups
            fileops.discard(backup_path(self.path, extra), self._report)
            extra += 1
        if self.backups > 0:
            fileops.discard(backup_path(self.path, self.backups), self._report)
            for index in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(backup_path(self.path, index), backup_path(self.path, index + 1))
            os.replace(self.path, backup_path(self.path, 1))
        else:
            fileops.discard(self.path, self._report)
        self._open()

    def _report(self, message: str) -> None:
        if self.on_write_error is not None:
            try:
                self.on_write_error(message)
            except Exception:
                self.listener_errors += 1

    def _notify(self, rec: dict[str, object]) -> None:
        for fn in list(self._listeners):  # a listener may remove itself
            try:
                fn(rec)
            except Exception as exc:
                self.listener_errors += 1
                if self.on_listener_error is not None:
                    try:
                        self.on_listener_error(exc)
                    except Exception:
                        self.listener_errors += 1


# ---------------------------------------------------------------- reading
#
# Every reader of the files (the daemon's ``history`` command, ``gosup
# history`` and its follower, ``gosup stage``, the next gosup looking for a
# predecessor that died) parses lines with parse_line() and reads with
# Last or Tail, so they agree on what a record is.


def parse_line(line: bytes) -> Record | None:
    """One record, or None for a blank, garbage or half-written line."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) else None


def wanted(rec: Record, program: str | None) -> bool:
    """Whether ``rec`` passes a ``--program`` filter (None: every record)."""
    return program is None or rec.get("program") == program


class _Filter:
    """Which lines are wanted. The writer's format is fixed (no spaces after
    separators), so a cheap substring test rules out most lines before JSON
    is parsed; a parsed record is then checked exactly."""

    def __init__(self, program: str | None, event_prefix: str | None) -> None:
        self.program = program
        self.event_prefix = event_prefix
        self.needles: list[bytes] = []
        if program is not None:
            self.needles.append(b'"program":' + json.dumps(program, ensure_ascii=False).encode())
        if event_prefix is not None:
            quoted = json.dumps(event_prefix, ensure_ascii=False)[:-1]  # open-ended
            self.needles.append(b'"event":' + quoted.encode())

    def parse(self, line: bytes) -> Record | None:
        if not all(needle in line for needle in self.needles):
            return None
        rec = parse_line(line)
        if rec is None or not wanted(rec, self.program):
            return None
        if self.event_prefix is not None and not str(rec.get("event", "")).startswith(
            self.event_prefix
        ):
            return None
        return rec


def _open_all(path: Path) -> list[IO[bytes]]:
    """The history and its backups, newest first, opened together: a rotation
    while we read moves nothing under us (a file seen twice is skipped)."""
    files: list[IO[bytes]] = []
    seen: set[tuple[int, int]] = set()
    for index in itertools.count():
        name = path if index == 0 else backup_path(path, index)
        try:
            f = open(name, "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            if index == 0:
                continue
            break
        st = os.fstat(f.fileno())
        if (st.st_dev, st.st_ino) in seen:
            f.close()
            continue
        seen.add((st.st_dev, st.st_ino))
        files.append(f)
    return files


class _Backwards:
    """Lines of files read last first in blocks, at most ``limit`` bytes in all."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit
        self.cut = False  # stopped at the limit before the beginning

    def lines(self, f: IO[bytes], end: int) -> Iterator[tuple[int, bytes]]:
        """(offset, line) from ``end`` back to the start of ``f``."""
        pos, head = end, b""
        while pos > 0:
            step = min(BLOCK, pos)
            if self.left is not None:
                if self.left <= 0:
                    self.cut = True
                    return
                step = min(step, self.left)
                self.left -= step
            pos -= step
            f.seek(pos)
            buf = f.read(step) + head
            parts = buf.split(b"\n")
            head = parts.pop(0)  # may continue in the block before
            stop = pos + len(buf)
            for line in reversed(parts):
                start = stop - len(line)
                yield start, line
                stop = start - 1
        yield 0, head


class Last:
    """The last ``n`` records (of ``program``; whose event starts with
    ``event_prefix``), oldest first, across the rotated files::

        with Last(path, 20, program="api") as last:
            for rec in last: ...
            if not last.complete: ...  # gave up looking at scan_limit bytes

    Finding where they start reads the files backwards, at most
    ``scan_limit`` bytes (None: no limit); the records are then streamed
    forwards, so memory stays one block whatever ``n`` is. Records appended
    meanwhile are not included. A missing history has no records.
    """

    def __init__(
        self,
        path: Path,
        n: int,
        program: str | None = None,
        *,
        event_prefix: str | None = None,
        scan_limit: int | None = SCAN_LIMIT,
    ) -> None:
        self._filter = _Filter(program, event_prefix)
        self._files = _open_all(path)
        self.complete = True
        self.count = 0
        self._start: tuple[int, int] | None = None
        self._ends = [f.seek(0, os.SEEK_END) for f in self._files]
        try:
            self._locate(max(n, 0), scan_limit)
        except BaseException:
            self.close()
            raise

    def _locate(self, n: int, scan_limit: int | None) -> None:
        if n == 0:
            return
        back = _Backwards(scan_limit)
        for index, f in enumerate(self._files):
            for offset, line in back.lines(f, self._ends[index]):
                if self._filter.parse(line) is not None:
                    self.count += 1
                    self._start = (index, offset)
                    if self.count == n:
                        return
            if back.cut:
                self.complete = False
                return

    def __iter__(self) -> Iterator[Record]:
        if self._start is None:
            return
        first, offset = self._start
        left = self.count
        for index in range(first, -1, -1):
            f = self._files[index]
            f.seek(offset if index == first else 0)
            for line in _lines_forward(f, self._ends[index]):
                rec = self._filter.parse(line)
                if rec is not None:
                    yield rec
                    left -= 1
                    if left == 0:
                        return

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> Last:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _lines_forward(f: IO[bytes], end: int) -> Iterator[bytes]:
    """Whole lines from the current position up to byte ``end``."""
    partial = b""
    left = end - f.tell()
    while left > 0:
        chunk = f.read(min(1 << 20, left))
        if not chunk:
            break
        left -= len(chunk)
        *lines, partial = (partial + chunk).split(b"\n")
        yield from lines
    if partial:
        yield partial  # a last line without its newline: parse_line decides


class Tail:
    """Following the history like ``tail -F``: `read_new()` yields the
    records appended since the last call.

    Starts at the end of the file (or its start when `from_end` is false).
    Waits for a missing file to appear; when the file is rotated, renamed
    or deleted (a new inode at `path`), the old one is read to its end and
    the new one from its start. A half-written last line is held until its
    newline arrives.
    """

    def __init__(self, path: Path, from_end: bool = True) -> None:
        self._path = path
        self._file: IO[bytes] | None = None
        self._identity: tuple[int, int] | None = None
        self._partial = b""
        # Only the file that exists when following starts is skipped; one
        # that appears or replaces it later is new, so read from its start.
        self._skip_existing = from_end
        self._open()

    def read_new(self) -> Iterator[Record]:
        if self._file is None and not self._open():
            return
        yield from self._drain()
        try:
            st = os.stat(self._path)
        except FileNotFoundError:  # removed or renamed away: wait for the next
            self.close()
            return
        if (st.st_dev, st.st_ino) != self._identity:
            self.close()  # replaced; the old file was drained above
            if self._open():
                yield from self._drain()
        elif self._file is not None and st.st_size < self._file.tell():
            self._file.seek(0)  # truncated in place
            self._partial = b""
            yield from self._drain()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._partial = b""

    def _open(self) -> bool:
        try:
            self._file = open(self._path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            self._skip_existing = False
            return False
        st = os.fstat(self._file.fileno())
        self._identity = (st.st_dev, st.st_ino)
        if self._skip_existing:
            self._file.seek(0, os.SEEK_END)
            self._skip_existing = False
        return True

    def _drain(self) -> Iterator[Record]:
        assert self._file is not None
        while chunk := self._file.read(1 << 20):
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for line in lines:
                rec = parse_line(line)
                if rec is not None:
                    yield rec
