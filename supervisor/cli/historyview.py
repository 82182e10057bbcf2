"""``gosup history``: the restart history for humans.

Reads with ``supervisor.history`` (the one reader of the file), follows it
like ``tail -F`` and formats one line per record. The record fields and the
command's options are described in docs/history.md. Works while gosup is
down: only the file is read, never the control socket.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from supervisor import history
from supervisor.cli.common import EXIT_OK, CLIError, escape, load_config
from supervisor.history import Record
from supervisor.protocol import HISTORY_NAME

# -- the command --------------------------------------------------------------------


def history_path(args: argparse.Namespace) -> Path:
    """``--state-dir``'s history file, else the one of the config ``-c`` names."""
    if args.state_dir:
        return Path(args.state_dir) / HISTORY_NAME
    return load_config(args.config).supervisor.state_dir / HISTORY_NAME


def cmd_history(args: argparse.Namespace) -> int:
    path = history_path(args)
    if not path.exists() and not args.follow:
        raise CLIError(f"no history yet at {path}")

    records = history.read(path, n=args.n, program=args.program) if path.exists() else []
    # The PROGRAM column is as wide as the longest name shown (it grows while following).
    width = max([len(_program_cell(rec)) for rec in records] + [len("PROGRAM")])

    def show(rec: Record) -> None:
        nonlocal width
        width = max(width, len(_program_cell(rec)))
        line = json.dumps(rec, ensure_ascii=False) if args.json else format_record(rec, width)
        print(line, flush=True)

    if not args.json:
        print(format_header(width))
    for rec in records:
        show(rec)
    if args.follow:
        try:
            for rec in follow(path, program=args.program):
                show(rec)
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


# -- following ----------------------------------------------------------------------


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
                if history.wanted(rec, program):
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
                rec = history.parse_line(line)
                if rec is not None:
                    yield rec


# -- formatting -------------------------------------------------------------------

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
_PROGRAM_WIDTH = len("PROGRAM")  # the least; cmd_history widens it to the longest name shown
_EVENT_WIDTH = max(map(len, history.EVENT_NAMES))
_MAX_VALUE = 120
_SHA256 = re.compile(r"[0-9a-f]{64}")


def format_header(program_width: int = _PROGRAM_WIDTH) -> str:
    """Column titles matching format_record()."""
    return _columns("TIME", "PROGRAM", "EVENT", "DETAILS", program_width)


def _program_cell(rec: dict[str, Any]) -> str:
    program = rec.get("program")
    return "-" if program is None else escape(program)


def format_record(rec: dict[str, Any], program_width: int = _PROGRAM_WIDTH) -> str:
    """One human line: time, program ("-" when supervisor-wide), event, key=value.

    Everything but the layout is escaped (cli.common.escape): crash messages
    and output tails are a program's own words."""
    ts = escape(str(rec.get("ts", "-")).replace("T", " ", 1))
    keys = [k for k in rec if k not in ("ts", "program", "event")]
    ordered = (
        [k for k in _FIRST if k in rec]
        + [k for k in keys if k not in _FIRST and k not in _LAST]
        + [k for k in _LAST if k in rec]
    )
    details = " ".join(f"{k}={_format_value(k, rec[k])}" for k in ordered if rec[k] is not None)
    event = escape(rec.get("event"))
    return _columns(ts, _program_cell(rec), event, escape(details), program_width)


def _columns(ts: str, program: str, event: str, details: str, program_width: int) -> str:
    line = f"{ts:<{_TS_WIDTH}}  {program:<{program_width}}  {event:<{_EVENT_WIDTH}}  {details}"
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
