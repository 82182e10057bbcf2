"""The history: every decision gosup takes, one JSON object per line.

`<state_dir>/history.jsonl` is what operators trust (docs/history.md), so a record
is handed to the kernel before the action it describes: each one is written
with a single unbuffered `write()` on a file opened for appending, so a
reader (`gosup history -f`, `tail -f`) never sees half a record unless the
machine dies mid-write, and then only the last line, which readers skip.

This module is the writer (`History`), the record names and the one way to
read the file (`read`, `read_from`); following and formatting for humans are
the command line's (`supervisor/cli/historyview.py`). Stdlib only: the CLI
imports it.
"""

from __future__ import annotations

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
#
# Every reader of the file (the daemon's ``history`` command, ``gosup
# history`` and its follower, ``gosup stage``) parses lines with parse_line()
# and reads with read() or read_from(), so they agree on what a record is.


def parse_line(line: bytes) -> Record | None:
    """One record, or None for a blank, garbage or half-written line."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) else None


def wanted(rec: Record, program: str | None) -> bool:
    """Whether ``rec`` passes a ``--program`` filter (None: every record)."""
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
        records = (r for r in map(parse_line, lines) if r is not None and wanted(r, program))
        if n is None:
            return list(records)
        found = list(itertools.islice(records, max(n, 0)))
        found.reverse()
        return found


def read_from(path: Path, offset: int) -> tuple[list[Record], int]:
    """The records whose lines end after byte `offset`, and the offset after
    the last whole line (where the next call starts).

    A half-written last line is left for the next call. A missing file has
    no records yet: ``([], offset)``.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = (parse_line(line) for line in data[:end].split(b"\n"))
    return [r for r in records if r is not None], offset + end


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
