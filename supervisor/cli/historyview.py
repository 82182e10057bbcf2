"""``gosup history``: the restart history for humans.

Reads with ``supervisor.history`` (the one reader of the file), follows it
like ``tail -F`` and formats one line per record. The record fields and the
command's options are described in docs/history.md. Works while gosup is
down: only the file is read, never the control socket.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from supervisor import history
from supervisor.cli.common import EXIT_OK, EXIT_USAGE, CLIError, escape, load_config
from supervisor.history import Record
from supervisor.protocol import HISTORY_NAME

SIZING = 10_000  # records read before the table's columns are sized

# -- the command --------------------------------------------------------------------


def history_path(args: argparse.Namespace) -> Path:
    """``--state-dir``'s history file, else the one of the config ``-c`` names."""
    if args.state_dir:
        return Path(args.state_dir) / HISTORY_NAME
    return load_config(args.config).supervisor.state_dir / HISTORY_NAME


def cmd_history(args: argparse.Namespace) -> int:
    path = history_path(args)
    if not path.exists() and not history.backup_path(path, 1).exists() and not args.follow:
        raise CLIError(f"no history yet at {path}")
    if args.n < 0:
        raise CLIError("-n must be >= 0", EXIT_USAGE)
    scan_limit = _scan_limit(args.max_scan)

    width = len("PROGRAM")  # the PROGRAM column: as wide as the longest name shown

    def show(rec: Record) -> None:
        nonlocal width
        width = max(width, len(_program_cell(rec)))
        line = json.dumps(rec, ensure_ascii=False) if args.json else format_record(rec, width)
        print(line, flush=True)

    # Follow from where the last records were read: nothing appended between
    # the two is lost, nothing is shown twice.
    tail = history.Tail(path) if args.follow else None
    try:
        with history.Last(path, args.n, args.program, scan_limit=scan_limit) as last:
            # The table is sized to its names: up to SIZING records are read
            # first; --json streams (memory does not grow with what is printed).
            found = iter(last)
            records = list(itertools.islice(found, 0 if args.json else SIZING))
            width = max([len(_program_cell(rec)) for rec in records] + [width])
            if not args.json:
                print(format_header(width))
            for rec in itertools.chain(records, found):
                show(rec)
            if not last.complete:
                print(
                    f"gosup history: found {last.count} of {args.n} records in the last "
                    f"{args.max_scan} of the history and looked no further "
                    "(--max-scan SIZE looks further, 0 = all of it)",
                    file=sys.stderr,
                )
        if tail is not None:
            try:
                for rec in follow(path, program=args.program, tail=tail):
                    show(rec)
            except KeyboardInterrupt:
                return EXIT_OK
    finally:
        if tail is not None:
            tail.close()
    return EXIT_OK


def _scan_limit(text: str) -> int | None:
    from supervisor.config.units import parse_size  # only here: the parser is built without it

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise CLIError(f"--max-scan: {exc}", EXIT_USAGE) from None
    return size or None


# -- following ----------------------------------------------------------------------


def follow(
    path: Path,
    program: str | None = None,
    poll: float = 0.25,
    stop: Callable[[], bool] | None = None,
    from_end: bool = True,
    tail: history.Tail | None = None,
) -> Iterator[Record]:
    """Yield records as they are appended, like `tail -F` (``history.Tail``,
    or ``tail`` when given: following from where it stands): across
    rotations, and on to a new file when the old one was renamed or
    deleted. `stop()` is checked once per poll; without it the generator
    runs until closed."""
    if tail is None:
        tail = history.Tail(path, from_end)
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
