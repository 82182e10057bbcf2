"""``gosup logs NAME``: a program's captured output, read from its log files.

gosup writes each program's stdout and stderr to ``<log_dir>/<NAME>.stdout.log``
and ``<NAME>.stderr.log``, rotated to ``.1`` .. ``.N`` (``core/output.py``,
``RotatingFile``: the current file is closed, the older ones shift up, the
current becomes ``.1`` and a new one is opened). This command reads those
files directly, so it works while gosup is down, and needs only read access
to them.

What it prints (docs/production.md, "Logs"):

* The last ``-n`` lines of each stream, read backwards from the end (across
  rotations when the current file has fewer), so the cost is what is
  printed, not the size of the files.
* Both streams by default, each line marked ``out |`` or ``err |``. The
  files carry no timestamps and two files have no common order, so the two
  tails are printed as two blocks, the stream written to last at the bottom
  (nearest the prompt, where the newest line is). With ``-f`` new lines are
  printed as they arrive, both streams interleaved in the order they were
  read (a poll every 0.2 s: lines of the two streams written within one poll
  may be printed stdout first).
* ``-f`` follows across rotations, like ``tail -F``: a file replaced at its
  name is read to its end first (the writer has closed it by then), then any
  file that was made and rotated away between two looks (found by where the
  old file went: ``.k`` means ``.k-1`` .. ``.1`` are newer), then the new one
  from its start.
* On a terminal, control characters other than tab are shown escaped
  (``\\x1b``; cli.common.escape), so a program cannot move the cursor, clear
  the screen or set the title of the operator reading its output; ``--raw``
  prints the bytes as written. Into a pipe or file the bytes go unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from supervisor.cli.common import (
    DEFAULT_CONFIG,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    escape,
    load_config,
)
from supervisor.protocol import PROGRAM_NAME

STREAMS = ("stdout", "stderr")
MARKS = {"stdout": b"out | ", "stderr": b"err | "}
BLOCK = 64 << 10  # bytes read at a time, backwards
LINE_MAX = 64 << 10  # bytes of one line kept when reading backwards (a longer one is cut)
POLL = 0.2  # seconds between looks while following


def log_path(log_dir: Path, name: str, stream: str) -> Path:
    """The current file of a program's stream (core/output.py names it so)."""
    return log_dir / f"{name}.{stream}.log"


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


# -- the tail: backwards from the end ---------------------------------------------------


def _lines_before(f: BinaryIO, end: int, n: int) -> tuple[list[bytes], bool]:
    """The last ``n`` lines of ``f`` before offset ``end`` (a last line without
    its newline counts), and whether the first of them is where the file
    starts (so a line split by a rotation may begin in the file before).
    Reads BLOCK bytes at a time from the end, and never more than about
    ``n`` * LINE_MAX."""
    if n <= 0 or end <= 0:
        return [], end <= 0
    data = b""
    pos = end
    budget = (n + 1) * LINE_MAX
    while pos > 0 and data.count(b"\n", 0, len(data) - 1) < n and end - pos < budget:
        size = min(BLOCK, pos)
        pos -= size
        f.seek(pos)
        data = f.read(size) + data
    lines = data[:-1].split(b"\n") if data.endswith(b"\n") else data.split(b"\n")
    if pos > 0:  # the first piece is the end of a line that started earlier
        lines = lines[1:] if len(lines) > n else [lines[0][-LINE_MAX:], *lines[1:]]
    return lines[-n:], pos == 0 and len(lines) <= n


def tail(current: tuple[BinaryIO, int] | None, path: Path, n: int) -> list[bytes]:
    """The last ``n`` lines of a stream: from the current file (open, read up to
    the given end), then from ``.1``, ``.2`` ... while more are needed."""
    lines: list[bytes] = []
    at_start = True  # lines[0] (if any) is where the newer file starts
    if current is not None:
        lines, at_start = _lines_before(*current, n)
    k = 1
    while at_start:
        try:
            with open(rotated(path, k), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(size - 1, 0))
                # A rotation can split a line (its writer's chunk ended mid-line):
                # then the older file's last piece begins the newer file's first line.
                split = size > 0 and f.read(1) != b"\n" and bool(lines)
                want = n - len(lines) + split
                if want <= 0:
                    break
                older, at_start = _lines_before(f, size, want)
        except FileNotFoundError:
            break
        if split and older:
            lines[0] = older.pop() + lines[0]
        lines = older + lines
        k += 1
    return lines[-n:] if n else []


# -- following ----------------------------------------------------------------------------


@dataclass
class Follower:
    """One stream's current file, read as it grows and across rotations."""

    path: Path
    f: BinaryIO | None = None
    identity: tuple[int, int] | None = None
    partial: bytes = b""
    mtime: int = 0  # ns
    end: int = 0  # where following starts (the tail was read up to here)

    def open(self, at_end: bool) -> bool:
        try:
            self.f = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except FileNotFoundError:
            return False
        st = os.fstat(self.f.fileno())
        self.identity, self.mtime = (st.st_dev, st.st_ino), st.st_mtime_ns
        self.end = st.st_size if at_end else 0
        self.f.seek(self.end)
        return True

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
        self.f = None

    def read_new(self) -> list[bytes]:
        """The lines completed since the last call."""
        if self.f is None and not self.open(at_end=False):
            return []
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        # Looked at before draining: a file replaced at its name was closed by
        # its writer first, so draining it now gets every line it will ever have.
        replaced = st is None or (st.st_dev, st.st_ino) != self.identity
        lines = self._drain()
        assert self.f is not None
        if replaced:
            # A line the rotation split goes on in the next file: the partial is kept.
            lines += self._missed()
            self.close()
            if st is not None and self.open(at_end=False):
                lines += self._drain()
        elif st is not None and st.st_size < self.f.tell():  # truncated in place
            self.f.seek(0)
            self.partial = b""
            lines += self._drain()
        return lines

    def _missed(self) -> list[bytes]:
        """The lines of files that were made and rotated away between two looks:
        where ours now is ``.k``, the files ``.k-1`` .. ``.1`` came after it.
        (When ours is gone, rotated off the end, there is no telling.)"""
        newer: list[Path] = []
        for k in range(1, 1000):
            try:
                st = os.stat(rotated(self.path, k))
            except FileNotFoundError:
                return []
            if (st.st_dev, st.st_ino) == self.identity:
                break
            newer.append(rotated(self.path, k))
        lines: list[bytes] = []
        for path in reversed(newer):
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                lines += self._lines_of(f)
        return lines

    def _drain(self) -> list[bytes]:
        assert self.f is not None
        return self._lines_of(self.f)

    def _lines_of(self, f: BinaryIO) -> list[bytes]:
        """The lines completed by what is left to read in ``f`` (after ``partial``)."""
        lines: list[bytes] = []
        while chunk := f.read(1 << 20):
            *done, self.partial = (self.partial + chunk).split(b"\n")
            lines += done
            if len(self.partial) > LINE_MAX:  # a line with no end in sight: show it anyway
                lines.append(self.partial)
                self.partial = b""
        return lines


# -- printing ----------------------------------------------------------------------------


class Printer:
    """Writes lines to stdout, marked with their stream when both are shown, and
    escaped on a terminal unless ``raw``."""

    def __init__(self, marked: bool, raw: bool) -> None:
        self.marked = marked
        self.escaped = not raw and sys.stdout.isatty()
        self.out = sys.stdout.buffer

    def write(self, stream: str, lines: list[bytes]) -> None:
        if not lines:
            return
        mark = MARKS[stream] if self.marked else b""
        if self.escaped:
            text = (escape(line.decode(errors="backslashreplace"), lines=True) for line in lines)
            lines = [t.encode() for t in text]
        self.out.write(b"".join(mark + line + b"\n" for line in lines))
        self.out.flush()


# -- the command -------------------------------------------------------------------------


def log_dir_of(args: argparse.Namespace) -> Path:
    """``--log-dir``, else the log_dir of the config ``-c`` names."""
    if args.log_dir:
        return Path(args.log_dir)
    return load_config(args.config).supervisor.log_dir


def cmd_logs(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise CLIError("-n must be >= 0", EXIT_USAGE)
    if not PROGRAM_NAME.fullmatch(args.name):
        raise CLIError(f"{args.name!r} is not a program name", EXIT_USAGE)
    log_dir = log_dir_of(args)
    streams = [s for s in STREAMS if getattr(args, s)] or list(STREAMS)
    followers = {s: Follower(log_path(log_dir, args.name, s)) for s in streams}
    opened = [s for s, f in followers.items() if f.open(at_end=True)]
    if not opened and not args.follow:
        raise CLIError(f"no output of {args.name!r} in {log_dir} (no {args.name}.*.log)")
    printer = Printer(marked=len(streams) > 1, raw=args.raw)
    try:
        # The stream written to last goes last, nearest the prompt.
        for s in sorted(opened, key=lambda s: followers[s].mtime):
            f = followers[s]
            assert f.f is not None
            printer.write(s, tail((f.f, f.end), f.path, args.n))
            f.f.seek(f.end)  # following goes on from where the tail ended
        for s in streams:
            if s not in opened:  # only rotated files, or none yet
                printer.write(s, tail(None, followers[s].path, args.n))
        if args.follow:
            _follow(followers, printer)
    finally:
        for f in followers.values():
            f.close()
    return EXIT_OK


def _follow(followers: dict[str, Follower], printer: Printer) -> None:
    try:
        while True:
            for stream, f in followers.items():
                printer.write(stream, f.read_new())
            time.sleep(POLL)
    except KeyboardInterrupt:
        return


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``gosup logs``'s options (called by commands.build_parser)."""
    p = sub.add_parser(
        "logs",
        help="show a program's captured output (reads the log files; works while gosup is down)",
        description="The last N lines of each of NAME's streams, from log_dir "
        "(NAME.stdout.log, NAME.stderr.log and their rotations). With both streams "
        "each line is marked 'out |' or 'err |'; the two tails are printed as two "
        "blocks, the stream written to last at the bottom (the files have no "
        "timestamps to merge them by); with -f new lines of both are printed as "
        "they arrive. On a terminal, control characters other than tab are shown "
        "escaped (\\x1b) unless --raw.",
    )
    p.add_argument("name", metavar="NAME", help="the program")
    p.add_argument(
        "-c",
        "--config",
        default=DEFAULT_CONFIG,
        help="the app.toml whose log_dir to read (default: ./app.toml)",
    )
    p.add_argument("--log-dir", metavar="DIR", help="read DIR instead of the config's log_dir")
    p.add_argument("-n", type=int, default=50, help="the last N lines of each stream (default 50)")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines, across rotations"
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only stdout, unmarked")
    which.add_argument("--stderr", action="store_true", help="only stderr, unmarked")
    p.add_argument(
        "--raw", action="store_true", help="print control characters unescaped, even on a terminal"
    )
    p.set_defaults(func=cmd_logs)
