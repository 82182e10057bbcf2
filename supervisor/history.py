"""The history: every decision gosup takes, one JSON object per line.

`<state_dir>/history.jsonl` is what operators trust (docs/history.md), so a record
is handed to the kernel before the action it describes: each one is written
with a single unbuffered `write()` on a file opened for appending, so a
reader (`gosup history -f`, `tail -f`) never sees half a record unless the
machine dies mid-write, and then only the last line, which readers skip.

This module is on the CLI's fast path: stdlib only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
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
        "restart_requested",
        "config_applied",
        "config_rejected",
        "config_rolled_back",
        "signal_sent",
        "build_started",
        "build_succeeded",
        "build_failed",
        "supervisor_started",
        "supervisor_reloaded",
        "supervisor_stopped",
    }
)

Record = dict[str, Any]
Listener = Callable[[dict[str, object]], None]


def now_rfc3339() -> str:
    """Wall-clock time for stamping records: "2026-11-26T23:48:48.123Z"."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_default(value: object) -> object:
    # Crash and similar records know their own JSON shape; anything else
    # (Path, enum members) is written as its string form.
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)


class History:
    """Append-only JSON-lines writer.

    `record()` writes and flushes before returning, so the record is with the
    OS before the action it describes. Call it from one thread (the loop).
    """

    def __init__(
        self,
        path: Path,
        on_listener_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.path = path
        # A listener (log line, metrics, a control client following the
        # history) must never cost us a record: its errors are counted and
        # passed to on_listener_error, never raised.
        self.on_listener_error = on_listener_error
        self.listener_errors = 0
        self._listeners: list[Listener] = []
        # mode only applies to the last component; parents get the umask default.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed by close()

    def record(self, event: str, program: str | None = None, **fields: object) -> dict[str, object]:
        """Write one record, tell the listeners, and return it.

        The returned dict (and what listeners get) is the record as a reader
        of the file will see it: Crash objects become dicts, paths strings.
        """
        if event not in EVENT_NAMES:
            raise ValueError(f"unknown history event {event!r}")
        if "ts" in fields:
            raise ValueError("'ts' is set by History.record()")
        head: dict[str, object] = {"ts": now_rfc3339()}
        if program is not None:
            head["program"] = program
        head["event"] = event
        line = json.dumps(
            head | fields, separators=(",", ":"), ensure_ascii=False, default=_json_default
        )
        self._write((line + "\n").encode())
        rec: dict[str, object] = json.loads(line)
        self._notify(rec)
        return rec

    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a short write is rare on a regular file, but allowed
            written = self._file.write(view)
            view = view[written or 0 :]

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


def _parse(line: bytes) -> Record | None:
    """One record, or None for a blank, garbage or half-written line."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) else None


def _wanted(rec: Record, program: str | None) -> bool:
    return program is None or rec.get("program") == program


def read(path: Path, n: int | None = None, program: str | None = None) -> list[Record]:
    """The last `n` records (all when None), oldest first, of `program` if given.

    For a small `n` only the end of the file is read, so this stays fast on a
    history of hundreds of megabytes. Raises FileNotFoundError.
    """
    with open(path, "rb") as f:
        lines = iter(f) if n is None else _lines_backwards(f)
        if program is not None:
            # Parsing JSON dominates; a line that does not even contain the
            # quoted name cannot be one of the program's records.
            needle = json.dumps(program, ensure_ascii=False).encode()
            lines = (line for line in lines if needle in line)
        records = (rec for rec in map(_parse, lines) if rec is not None and _wanted(rec, program))
        if n is None:
            return list(records)
        found = list(itertools.islice(records, max(n, 0)))
        found.reverse()
        return found


def _lines_backwards(f: IO[bytes], block: int = 64 * 1024) -> Iterator[bytes]:
    """The file's lines, last first, reading fixed-size blocks from the end."""
    pos = f.seek(0, os.SEEK_END)
    head = b""  # the start of a line whose beginning lies in an earlier block
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        lines = (f.read(step) + head).split(b"\n")
        head = lines.pop(0)
        yield from reversed(lines)
    yield head


def follow(
    path: Path,
    program: str | None = None,
    poll: float = 0.25,
    stop: Callable[[], bool] | None = None,
    from_end: bool = True,
) -> Iterator[Record]:
    """Yield records as they are appended, like `tail -F`.

    Starts at the end of the file (or its start when `from_end` is false).
    Waits for a missing file to appear; when the file is truncated or
    replaced (a new inode at `path`), reads the new one from its start. A
    half-written last line is held until its newline arrives. `stop()` is
    checked once per poll; without it the generator runs until closed.
    """
    tail = _Tail(path, from_end)
    try:
        while True:
            for rec in tail.read_new():
                if _wanted(rec, program):
                    yield rec
            if stop is not None and stop():
                return
            time.sleep(poll)
    finally:
        tail.close()


class _Tail:
    """The reading side of follow(): one open file and the unfinished line."""

    def __init__(self, path: Path, from_end: bool) -> None:
        self._path = path
        self._file: IO[bytes] | None = None
        self._identity: tuple[int, int] | None = None
        self._partial = b""
        # Only the file that exists when following starts is skipped; one
        # that appears or replaces it later is new, so read from its start.
        self._skip_existing = from_end

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
                rec = _parse(line)
                if rec is not None:
                    yield rec


# ---------------------------------------------------------------- formatting

# The fields an operator scans for first, in this order; others follow in the
# order they were recorded, and the long free-text ones come last.
_FIRST = (
    "pid",
    "attempt",
    "attempts",
    "exit_code",
    "signal",
    "uptime_s",
    "reason",
    "delay_s",
    "killed",
    "metric",
    "value",
    "limit",
    "samples",
    "kind",
    "path",
    "sha256",
    "previous_sha256",
    "restored_sha256",
    "expected",
    "actual",
    "duration_s",
    "version",
)
_LAST = ("command", "crash", "output_tail")
_TS_WIDTH = len("2026-11-26 23:48:48.123Z")
_PROGRAM_WIDTH = 12
_EVENT_WIDTH = max(map(len, EVENT_NAMES))
_MAX_VALUE = 120
_SHA256 = re.compile(r"[0-9a-f]{64}")


def format_header() -> str:
    """Column titles matching format_record()."""
    return _columns("TIME", "PROGRAM", "EVENT", "DETAILS")


def format_record(rec: dict[str, Any]) -> str:
    """One human line: time, program ("-" when supervisor-wide), event, key=value."""
    ts = str(rec.get("ts", "-")).replace("T", " ", 1)
    program = rec.get("program")
    keys = [k for k in rec if k not in ("ts", "program", "event")]
    ordered = (
        [k for k in _FIRST if k in rec]
        + [k for k in keys if k not in _FIRST and k not in _LAST]
        + [k for k in _LAST if k in rec]
    )
    details = " ".join(f"{k}={_format_value(k, rec[k])}" for k in ordered if rec[k] is not None)
    return _columns(ts, "-" if program is None else str(program), str(rec.get("event")), details)


def _columns(ts: str, program: str, event: str, details: str) -> str:
    line = f"{ts:<{_TS_WIDTH}}  {program:<{_PROGRAM_WIDTH}} {event:<{_EVENT_WIDTH}} {details}"
    return line.rstrip()


def _format_value(key: str, value: object) -> str:
    if key == "crash" and isinstance(value, dict):
        text = f"{value.get('kind')}: {value.get('message')}"
        return f"{text} ({value['frame']})" if value.get("frame") else text
    if key == "output_tail" and isinstance(value, str):
        # The compiler's last words are the ones that say what went wrong.
        lines = value.strip().splitlines()
        value = lines[-1] if lines else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if _SHA256.fullmatch(value):
            return value[:12]  # enough to tell versions apart; --json has it all
        if len(value) > _MAX_VALUE:
            value = value[: _MAX_VALUE - 3] + "..."
        needs_quotes = not value or any(c.isspace() or c in "\"'=" for c in value)
        return json.dumps(value, ensure_ascii=False) if needs_quotes else value
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return str(value)
