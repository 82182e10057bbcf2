"""Recognise a Go crash in the tail of a program's stderr.

When a Go program dies on its own, the runtime prints one of a few headers at
the start of a line, then (unless GOTRACEBACK=none) the crashing goroutine's
stack:

    panic: <value> [recovered]          a Go panic nobody recovered
    \tpanic: <value>                    ...a panic raised while panicking
    [signal SIGSEGV: ...]               ...a runtime error caused by a fault
    fatal error: <message>              runtime.throw: deadlock, map race, OOM
    SIGSEGV: segmentation violation     a fault outside Go code (cgo) or
    PC=0x... m=0 sigcode=1              with GOTRACEBACK=crash

    goroutine 1 [running]:
    main.handler(0xc000010000, {0x4b2f60, 0x3})
    \t/src/main.go:42 +0x1d

The tail may hold earlier output too, so the last header wins: it is the one
that ended the process. Headers are only recognised at the start of a line,
so a log line that merely mentions a panic is not a crash. The first line of
the tail may be a fragment; it is read as if it started a line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Crash:
    """How a Go program died, as recorded in the `exited` history event."""

    kind: str  # "panic" | "fatal_error" | "signal" | "oom"
    message: str
    frame: str | None = None  # "main.handler at /src/main.go:42"

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "message": self.message, "frame": self.frame}


_PANIC = re.compile(r"panic: (?P<message>.*)")
# printpanics() marks a value that was recovered and then panicked again.
_RECOVERED = re.compile(r" \[recovered(?:, repanicked)?\]$")
_FATAL = re.compile(r"fatal error: (?P<message>.*)")
# The runtime's sigtable names ("SIGSEGV: segmentation violation"). A program
# may log such a line itself, so it only counts when followed by the
# "PC=0x... m=0 sigcode=1" line that sighandler() always prints next.
_SIGNAL = re.compile(r"(?P<message>(?P<name>SIG[A-Z0-9]+): .+)")
_SIGNAL_PC = re.compile(r"PC=0x[0-9a-fA-F]+ ")
# "goroutine 1 [running]:", or with GOTRACEBACK=system (Go 1.23+)
# "goroutine 1 gp=0xc000002380 m=0 mp=0x5a5520 [running]:". Matched by
# is_goroutine_header(), not by one regex: r"goroutine \d+ (?:.* )?\[[^\]]*\]:"
# backtracks quadratically on a crafted line ("goroutine 1 [ [ [ ..."), and
# the tail is the program's to write (2.4 s of CPU for 64 KiB).
_GOROUTINE_PREFIX = re.compile(r"goroutine \d+ ")
# A frame's function line ends in its argument list; the name itself may hold
# parentheses ("main.(*Server).handle"), the arguments never do.
_FUNCTION = re.compile(r"(?P<function>[^\s].*)\([^()]*\)")
# "\t/src/main.go:42 +0x1d", possibly followed by " fp=0x... sp=0x... pc=0x...".
_LOCATION = re.compile(r"\t(?P<location>.+?:\d+)(?: .*)?")
# Frames of the runtime itself say where Go noticed the crash, not whose it is.
_RUNTIME_PREFIXES = ("runtime.", "runtime/", "internal/runtime/")


@dataclass(frozen=True)
class _Header:
    line: int
    kind: str  # a Crash kind, or "dump" for a SIGQUIT goroutine dump
    message: str


def parse(stderr_tail: str) -> Crash | None:
    """Return the crash that ended the program, or None when there is none.

    A SIGQUIT goroutine dump (`kill -QUIT`, which gosup itself sends to save
    evidence) ends the program too, but it is not a crash: None.
    """
    lines = [line.rstrip("\r") for line in stderr_tail.split("\n")]
    headers = list(_headers(lines))
    if not headers:
        return None
    last = len(headers) - 1
    if headers[last].kind == "dump":
        return None
    if headers[last].kind == "panic":
        # Report the original panic of the final block, not one raised later
        # by a deferred call while it unwound.
        while last > 0 and _same_panic_block(lines, headers[last - 1], headers[last]):
            last -= 1
    header = headers[last]
    return Crash(header.kind, header.message, _crashing_frame(lines, header.line))


def oom_crash() -> Crash:
    """The crash record for a child the kernel's OOM killer ended (SIGKILL)."""
    return Crash("oom", "killed by the kernel OOM killer")


def is_goroutine_header(line: str) -> bool:
    """Whether ``line`` opens a goroutine's stack, in time linear in its length.

    The same language as ``goroutine \\d+ (?:.* )?\\[[^\\]]*\\]:``: the prefix,
    then the state in brackets at the very end, its "[" either right after
    the prefix or after a space.
    """
    prefix = _GOROUTINE_PREFIX.match(line)
    if prefix is None or not line.endswith("]:"):
        return False
    start = prefix.end()
    close = len(line) - 2
    # The state's "[" comes after the last "]" before the closing one.
    after = max(line.rfind("]", start, close), start - 1)
    opening = line.find("[", after + 1, close)
    while opening != -1:
        if opening == start or line[opening - 1] == " ":
            return True
        opening = line.find("[", opening + 1, close)
    return False


def _headers(lines: list[str]) -> Iterator[_Header]:
    for number, line in enumerate(lines):
        if match := _PANIC.match(line):
            yield _Header(number, "panic", _RECOVERED.sub("", match["message"]))
        elif match := _FATAL.match(line):
            yield _Header(number, "fatal_error", match["message"])
        elif (match := _SIGNAL.fullmatch(line)) and _followed_by_pc(lines, number):
            kind = "dump" if match["name"] == "SIGQUIT" else "signal"
            yield _Header(number, kind, match["message"])


def _followed_by_pc(lines: list[str], number: int) -> bool:
    return number + 1 < len(lines) and _SIGNAL_PC.match(lines[number + 1]) is not None


def _same_panic_block(lines: list[str], earlier: _Header, later: _Header) -> bool:
    """True when two panic headers belong to one crash (no traceback between)."""
    between = lines[earlier.line + 1 : later.line]
    return earlier.kind == "panic" and not any(is_goroutine_header(x) for x in between)


def _crashing_frame(lines: list[str], header_line: int) -> str | None:
    """First non-runtime frame of the first goroutine printed after the header."""
    start = next(
        (i + 1 for i in range(header_line + 1, len(lines)) if is_goroutine_header(lines[i])),
        None,
    )
    if start is None:
        return None  # GOTRACEBACK=none, or the traceback fell outside the tail
    frames = list(_frames(lines, start))
    user = [f for f in frames if f[0] != "panic" and not f[0].startswith(_RUNTIME_PREFIXES)]
    if not frames:
        return None
    function, location = (user or frames)[0]
    return f"{function} at {location}"


def _frames(lines: list[str], start: int) -> Iterator[tuple[str, str]]:
    """(function, "file:line") pairs of one goroutine, up to its blank line.

    Lines that are not a function/location pair ("created by ...",
    "...additional frames elided...") are stepped over.
    """
    i = start
    while i + 1 < len(lines) and lines[i].strip():
        function = _FUNCTION.fullmatch(lines[i])
        location = _LOCATION.fullmatch(lines[i + 1])
        if function and location and not lines[i].startswith("created by "):
            yield function["function"], location["location"]
            i += 2
        else:
            i += 1
