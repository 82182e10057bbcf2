"""Capture of a child's stdout and stderr.

The hot path is ``PipeReader.data_received`` (``Stream.feed``): the event loop hands over
chunks of up to 256 KiB, which go straight to an unbuffered file with one
``write`` each. Nothing is split into lines unless a terminal is attached, so
a child flooding its output costs one syscall per chunk and gosup's memory
does not grow (asyncio stops reading the pipe while we write, and the kernel's
pipe buffer pushes back on the child).

stderr also keeps a bounded tail, which is what the Go crash parser reads
after the child exits (the runtime writes its panic there), and can be tapped
for the rest of a run (a SIGQUIT goroutine dump): taps end with the run's
pipes, so the next child's output never reaches them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

from supervisor.core.lines import LineSplitter, Tail

TAIL_BYTES = 64 * 1024
_COLOURS = (36, 32, 33, 35, 34, 96, 92, 93, 95, 94)


class RotatingFile:
    """An append-only file rotated to ``name.1 .. name.N`` when it would pass ``max_size``."""

    def __init__(self, path: Path, max_size: int, backups: int) -> None:
        self.path = path
        self.max_size = max_size
        self.backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()
        self.size = os.fstat(self._file.fileno()).st_size

    def _open(self) -> BinaryIO:
        return open(self.path, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.max_size:
            # Rotate at a line boundary: the part that fits, up to its last newline,
            # closes the old file. (Only on this rare path do we look at the bytes.)
            cut = data.rfind(b"\n", 0, max(self.max_size - self.size, 0)) + 1
            if cut:
                self._file.write(data[:cut])
                data = data[cut:]
            if self.size + cut > 0:
                self.rotate()
        self._file.write(data)
        self.size += len(data)

    def rotate(self) -> None:
        self._file.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._file = self._open()
        self.size = 0

    def close(self) -> None:
        self._file.close()


class TerminalEcho:
    """Prints whole lines to a terminal as ``name | line`` in the program's colour."""

    def __init__(self, name: str, width: int, out: BinaryIO | None = None, colour: bool = True):
        code = _COLOURS[sum(name.encode()) % len(_COLOURS)]
        label = name.ljust(width).encode()
        self._prefix = (
            f"\x1b[{code}m".encode() + label + b" |\x1b[0m " if colour else label + b" | "
        )
        self._out = out if out is not None else sys.stdout.buffer
        self._lines = LineSplitter(TAIL_BYTES)  # a "line" with no end in sight: print it anyway

    def feed(self, data: bytes) -> None:
        self._write(self._lines.feed(data))

    def flush(self) -> None:
        self._write(self._lines.flush())

    def _write(self, lines: list[bytes]) -> None:
        if lines:
            prefix = self._prefix
            with contextlib.suppress(OSError, ValueError):
                self._out.write(b"".join(prefix + line + b"\n" for line in lines))
                self._out.flush()


class Stream:
    """One of the program's two streams, shared by all its runs."""

    def __init__(self, file: RotatingFile, echo: TerminalEcho | None, keep_tail: bool) -> None:
        self.file = file
        self.echo = echo
        self.tail = Tail(TAIL_BYTES) if keep_tail else None
        self.bytes_total = 0
        self._taps: list[Callable[[bytes], None]] = []

    def feed(self, data: bytes) -> None:
        self.file.write(data)
        self.bytes_total += len(data)
        if self.echo is not None:
            self.echo.feed(data)
        if self.tail is not None:
            self.tail.feed(data)
        for tap in self._taps:
            tap(data)

    def tap(self, fn: Callable[[bytes], None]) -> Callable[[], None]:
        """Hand ``fn`` every chunk from now until the current pipes are detached
        (the run is over) or the returned remover is called."""
        self._taps.append(fn)

        def remove() -> None:
            if fn in self._taps:
                self._taps.remove(fn)

        return remove

    def untap_all(self) -> None:
        self._taps.clear()

    def tail_text(self) -> str:
        return self.tail.text() if self.tail is not None else ""


class PipeReader(asyncio.Protocol):
    """Hands each chunk a pipe delivers to ``feed``; at the end of the pipe it
    calls ``at_end`` (if any) and resolves ``done``. Program output and build
    output (service/builder.py) are read with it."""

    def __init__(
        self,
        feed: Callable[[bytes], None],
        done: asyncio.Future[None],
        at_end: Callable[[], None] | None = None,
    ) -> None:
        self.data_received = feed  # type: ignore[method-assign,assignment]  # hot path: no extra call
        self.done = done
        self.at_end = at_end

    def connection_lost(self, exc: Exception | None) -> None:
        if self.at_end is not None:
            self.at_end()
        if not self.done.done():
            self.done.set_result(None)


def _given(protocol: PipeReader) -> Callable[[], PipeReader]:
    return lambda: protocol


class OutputCapture:
    """A program's log files, attached to each new child's pipes in turn."""

    def __init__(
        self, name: str, log_dir: Path, max_size: int, backups: int, echo_width: int | None
    ) -> None:
        colour = echo_width is not None and sys.stdout.isatty()

        def echo() -> TerminalEcho | None:
            return TerminalEcho(name, echo_width, colour=colour) if echo_width else None

        self.stdout = Stream(
            RotatingFile(log_dir / f"{name}.stdout.log", max_size, backups), echo(), keep_tail=False
        )
        self.stderr = Stream(
            RotatingFile(log_dir / f"{name}.stderr.log", max_size, backups), echo(), keep_tail=True
        )
        self._transports: list[asyncio.BaseTransport] = []
        self._done: list[asyncio.Future[None]] = []

    async def attach(self, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        """Start pumping a new child's pipes (the previous run's must be detached)."""
        loop = asyncio.get_running_loop()
        if self.stderr.tail is not None:
            self.stderr.tail.clear()
        for pipe, stream in ((stdout, self.stdout), (stderr, self.stderr)):
            done: asyncio.Future[None] = loop.create_future()
            at_end = stream.echo.flush if stream.echo is not None else None
            protocol = PipeReader(stream.feed, done, at_end)
            transport, _ = await loop.connect_read_pipe(_given(protocol), pipe)
            self._transports.append(transport)
            self._done.append(done)

    async def drain(self, timeout: float) -> None:
        """Wait for both pipes to reach EOF (so a crash's last words are read), then
        close them; a descendant that keeps the pipe open cannot hold us longer than ``timeout``."""
        if self._done:
            await asyncio.wait(self._done, timeout=timeout)
        self.detach()

    def detach(self) -> None:
        for transport in self._transports:
            transport.close()
        self._transports.clear()
        self._done.clear()
        self.stdout.untap_all()  # a tap lasts one run
        self.stderr.untap_all()

    def set_rotation(self, max_size: int, backups: int) -> None:
        """New ``[logs]`` settings (a reload), from the next write on."""
        for stream in (self.stdout, self.stderr):
            stream.file.max_size, stream.file.backups = max_size, backups

    def close(self) -> None:
        self.detach()
        self.stdout.file.close()
        self.stderr.file.close()
