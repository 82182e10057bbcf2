"""Capture of a child's stdout and stderr.

The hot path is ``PipePump._read_ready`` (``Stream.feed``): the event loop hands over
chunks of up to 256 KiB, which go straight to an unbuffered file with one
``write`` each. Nothing is split into lines unless a terminal is attached, so
a child flooding its output costs one syscall per chunk and gosup's memory
does not grow (asyncio stops reading the pipe while we write, and the kernel's
pipe buffer pushes back on the child).

A flood gives way to supervision: while a pipe hands over full chunks and
the loop runs late (``BulkPacer``), that pipe rests between chunks and the
child's writes wait in its pipe, so restarts, timers and replies come
first; on a machine with CPU to spare a flood is read as fast as it comes.

Each run's stderr also keeps a bounded tail of its own, which is what the Go
crash parser and the exit record's ``output_tail`` read after that child
exits (the runtime writes its panic there): during an overlap restart the old
process's last words go to the old run's tail, never the replacement's.
stderr can be tapped for the rest of a run (a SIGQUIT goroutine dump): taps
end with the run's pipes, so the next child's output never reaches them.

Logging degrades, supervision does not (docs/architecture.md): a log write
that fails (a full disk, a deleted log_dir) drops that chunk, says so once
per burst, and is tried again (the directory and file re-created) a second
later or at the next start; nothing raises into the event loop. The files
are open while a run's pipes are attached and for ``IDLE_CLOSE`` seconds
after, so a program restarting at once or after a short backoff (a crash
loop) keeps its descriptors instead of paying a stat, two opens, a fstat
and a close per file and run, and a configured program that is not running
holds no descriptor for long. The terminal echo goes through a
``DroppingWriter``: a reader that stops reading (``gosup run | less``, paused)
costs dropped echo lines, counted, never a stalled loop.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import os
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from loguru import logger

from supervisor import fileops
from supervisor.core.lines import LineSplitter, Tail

TAIL_BYTES = 64 * 1024
_COLOURS = (36, 32, 33, 35, 34, 96, 92, 93, 95, 94)
LOG_DIR_MODE = 0o750  # log files and their directory, whatever gosup's umask (docs/config.md)
LOG_FILE_MODE = 0o640
RETRY_AFTER = 1.0  # seconds a failed log file waits before it is tried again
IDLE_CLOSE = 2.0  # seconds the files stay open after a run, for the next run of a restart


def prepare_log_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; one gosup creates gets
    mode 0750 whatever the umask. An existing directory is left as it is."""
    if path.is_dir():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=LOG_DIR_MODE)
        os.chmod(path, LOG_DIR_MODE)


def _open_log(path: Path) -> int:
    """Open ``path`` for appending; a file created here gets 0640 whatever the umask.
    The file usually exists: one ``open`` then, a second only to create it."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    while True:
        with contextlib.suppress(FileNotFoundError):
            return os.open(path, flags)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, LOG_FILE_MODE)
        except FileExistsError:  # created between the two: open it
            continue
        os.fchmod(fd, LOG_FILE_MODE)
        return fd


LINE_FINISH = 64 << 10  # how far past max_size a line is finished before rotating


class RotatingFile:
    """An append-only file rotated to ``name.1 .. name.N`` when it would pass ``max_size``.

    Opened by ``open`` (at each run's start: a file renamed or deleted under
    us, or a deleted directory, is re-created then), closed by ``close``.
    ``write`` never raises: a chunk that cannot be written is dropped and
    counted, the first failure of a burst is logged, and the file is opened
    again ``RETRY_AFTER`` later.
    """

    def __init__(self, path: Path, max_size: int, backups: int) -> None:
        self.path = path
        self.max_size = max_size
        self.backups = backups
        self.size = 0
        self.dropped = 0  # bytes lost to write errors, all told
        self._mid_line = False  # the file ends inside a line (no newline yet)
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._failed_at: float | None = None  # when the current burst of failures began
        self._burst = 0  # bytes dropped in the current burst

    def open(self) -> None:
        """Open the file, or re-open it when its path no longer names the open file."""
        if self._fd is not None and self._still_ours():
            return
        self.close()
        # What a killed gosup's rotation left to delete (once per directory and gosup).
        fileops.sweep_discarded(self.path.parent, _discard_failed)
        try:
            try:
                self._fd = _open_log(self.path)
            except FileNotFoundError:  # log_dir is gone (or was never made): make it
                prepare_log_dir(self.path.parent)
                self._fd = _open_log(self.path)
            st = os.fstat(self._fd)
            self.size, self._identity = st.st_size, (st.st_dev, st.st_ino)
        except OSError as exc:
            self._failed(exc, 0)

    def _still_ours(self) -> bool:
        """Whether the path still names the open file (one stat: the open
        file's identity was taken when it was opened)."""
        try:
            on_disk = os.stat(self.path)
        except OSError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == self._identity

    def write(self, data: bytes) -> None:
        if self._fd is None:
            if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER:
                self._drop(len(data))
                return
            self.open()
            if self._fd is None:
                self._drop(len(data))
                return
        try:
            self._write(data)
        except OSError as exc:
            self._failed(exc, len(data))
            return
        if self._burst:
            logger.warning(
                "{}: writing again ({} bytes of output were lost)", self.path, self._burst
            )
        self._failed_at, self._burst = None, 0

    def _write(self, data: bytes) -> None:
        if self.size + len(data) > self.max_size:
            # Rotate at a line boundary: the part that fits, up to its last newline,
            # closes the old file. (Only on this rare path do we look at the bytes.)
            cut = data.rfind(b"\n", 0, max(self.max_size - self.size, 0)) + 1
            if not cut and self._mid_line:
                # The file ends inside a line (a chunk can end anywhere): finish
                # that line here, a little past max_size, rather than split it
                # across two files; a line longer than LINE_FINISH is split.
                cut = data.find(b"\n", 0, LINE_FINISH) + 1
            if cut:
                self._write_all(data[:cut])
                data = data[cut:]
            if self.size > 0:
                self.rotate()
        self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            assert self._fd is not None
            written = os.write(self._fd, view)
            self.size += written
            view = view[written:]
        if data:
            self._mid_line = not data.endswith(b"\n")

    def rotate(self) -> None:
        """name -> name.1 -> ... -> name.N; what goes is discarded
        (``fileops.discard``): no rename here lands on a file, so none frees
        blocks on the loop."""
        self.close()
        if self.backups == 0:
            fileops.discard(self.path, _discard_failed)
        else:
            fileops.discard(
                self.path.with_name(f"{self.path.name}.{self.backups}"), _discard_failed
            )
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self.size = 0
        self._mid_line = False
        self._fd = _open_log(self.path)
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino)

    def _failed(self, exc: OSError, lost: int) -> None:
        self.close()
        if self._failed_at is None:  # one line per burst, not one per chunk
            logger.error(
                "{}: cannot write ({}); dropping output, trying again every {:g}s",
                self.path,
                exc.strerror or exc,
                RETRY_AFTER,
            )
        self._failed_at = time.monotonic()
        self._drop(lost)

    def _drop(self, lost: int) -> None:
        self.dropped += lost
        self._burst += lost

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def _discard_failed(message: str) -> None:
    logger.warning("old log backup: {}", message)


class Writer(Protocol):
    def write(self, data: bytes) -> object: ...


COALESCE = 0.01  # seconds a writer thread waits for more after a few lines
COALESCE_BYTES = 64 << 10  # past this much queued, it writes at once


class DroppingWriter:
    """Writes to an output that may stall (a terminal, a pipe, journald's
    stream) without ever blocking the caller.

    ``write`` only queues, up to ``max_bytes``; one thread per writer does the
    blocking writes. When the queue is full the data is dropped and counted
    (``dropped_bytes``), and once the reader keeps up again a line says how
    much was lost. Thread-safe: the event loop and loguru's sink (any thread)
    may share one. ``close`` waits at most ``timeout`` for the queue to drain.
    While lines keep coming (within ``COALESCE`` of the last write), those
    of the next ``COALESCE`` go out in one write: the thread is woken once
    for them, not once per line (a crash loop of 200 programs logs a few
    hundred lines a second); a line after a quiet spell is written at once.
    """

    def __init__(self, fd: int, max_bytes: int = 1 << 20, label: str = "output") -> None:
        self.fd = fd
        self.max_bytes = max_bytes
        self.label = label
        self.dropped_bytes = 0
        self._unreported = 0
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._closed = False
        self._broken = False  # the reader is gone (EPIPE): nothing more is written
        self._thread: threading.Thread | None = None
        self._wrote_at = -COALESCE  # time.monotonic() of the thread's last write

    def write(self, data: bytes) -> int:
        """Queue ``data``; returns its length, or 0 when it was dropped."""
        with self._cond:
            if self._closed or self._broken:
                return 0
            if self._queued + len(data) > self.max_bytes:
                self.dropped_bytes += len(data)
                self._unreported += len(data)
                return 0
            self._queue.append(data)
            self._queued += len(data)
            # The thread waits for a first chunk, then COALESCE for more unless
            # COALESCE_BYTES are queued: only those two moments need a wake-up.
            if len(self._queue) == 1 or self._queued >= COALESCE_BYTES:
                self._cond.notify()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"gosup-writer:{self.label}", daemon=True
                )
                self._thread.start()
        return len(data)

    def flush(self) -> None:
        """Nothing to do: the thread writes as soon as it can (loguru calls this)."""

    def close(self, timeout: float = 1.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()  # (also ends a wait for more lines)
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                busy = time.monotonic() - self._wrote_at < COALESCE
                if busy and not self._closed and self._queued < COALESCE_BYTES:
                    # Lines keep coming (a crash loop logs two per run): wait a
                    # moment for more, one wake-up and one write for them all.
                    # A line after a quiet spell is written at once.
                    self._cond.wait(COALESCE)
                chunks, self._queue = list(self._queue), collections.deque()
                self._queued = 0
                lost, self._unreported = self._unreported, 0
            data = b"".join(chunks)
            if lost:
                note = (
                    f"[gosup: {lost} bytes of {self.label} dropped: the reader was not reading]\n"
                )
                data = note.encode() + data
            if not self._write_all(data):
                with self._cond:
                    self._broken = True
                    self._queue.clear()
                return
            self._wrote_at = time.monotonic()

    def _write_all(self, data: bytes) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:  # someone made the descriptor non-blocking
                select.select([], [self.fd], [], 1.0)
            except InterruptedError:
                continue
            except OSError:  # EPIPE (the reader is gone), EIO (the terminal hung up) ...
                return False
        return True


_stdout: DroppingWriter | None = None


def stdout_writer() -> DroppingWriter:
    """The one DroppingWriter of gosup's stdout (the terminal echo of every
    program and build), flushed for at most a second at exit."""
    global _stdout
    if _stdout is None:
        _stdout = DroppingWriter(sys.stdout.fileno(), label="stdout")
        atexit.register(_stdout.close)
    return _stdout


class TerminalEcho:
    """Prints whole lines to a terminal as ``name | line`` in the program's colour."""

    def __init__(self, name: str, width: int, out: Writer | None = None, colour: bool = True):
        code = _COLOURS[sum(name.encode()) % len(_COLOURS)]
        label = name.ljust(width).encode()
        self._prefix = (
            f"\x1b[{code}m".encode() + label + b" |\x1b[0m " if colour else label + b" | "
        )
        self._out = out if out is not None else stdout_writer()
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


class Stream:
    """One of the program's two streams, shared by all its runs."""

    def __init__(self, file: RotatingFile, echo: TerminalEcho | None, keep_tail: bool) -> None:
        self.file = file
        self.echo = echo
        self.keep_tail = keep_tail
        self.tail: Tail | None = None  # the current run's (each run feeds its own)
        self.bytes_total = 0
        self._taps: list[Callable[[bytes], None]] = []

    def feed(self, data: bytes) -> None:
        self.file.write(data)  # never raises: a failed write is dropped and counted
        self.bytes_total += len(data)
        if self.echo is not None:
            self.echo.feed(data)
        if self._taps:  # the hot path: no copy of an empty list per chunk
            self._feed_taps(data)

    def _feed_taps(self, data: bytes) -> None:
        for tap in list(self._taps):
            try:
                tap(data)
            except Exception as exc:  # a listener's bug costs its tap, not the capture
                logger.opt(exception=exc).error("an output tap failed; removed")
                self._taps.remove(tap)

    def tap(self, fn: Callable[[bytes], None]) -> Callable[[], None]:
        """Hand ``fn`` every chunk from now until the current pipes are detached
        (the run is over) or the returned remover is called."""
        self._taps.append(fn)

        def remove() -> None:
            if fn in self._taps:
                self._taps.remove(fn)

        return remove

    def run_feed(self) -> tuple[Callable[[bytes], None], Tail | None]:
        """A new run's feed, and its own tail (made the current one) if this
        stream keeps tails: a process beside the run (the old one of an
        overlap) goes on feeding its own tail, never the new run's."""
        if not self.keep_tail:
            return self.feed, None
        tail = self.tail = Tail(TAIL_BYTES)
        feed, keep = self.feed, tail.feed

        def feed_and_keep(data: bytes) -> None:
            feed(data)
            keep(data)

        return feed_and_keep, tail

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


READ_SIZE = 256 * 1024  # what one read of a pipe hands over at most (as asyncio's pipes)


class BulkPacer:
    """Output that floods gives way to supervision when the loop runs late.

    A pipe that hands over a full chunk (``READ_SIZE``: the child writes
    faster than gosup reads) is flooding, and each of its chunks costs the
    loop a read and a write of 256 KiB. While any pipe floods, a timer every
    ``PROBE`` seconds measures how late the loop runs it. When it runs more
    than ``LATE`` late ``STREAK`` times in a row (the machine's CPUs are
    full, or the loop has more to do than it can; one slow write is not
    that), a flooding pipe rests ``PAUSE`` after each full chunk for the
    next ``HOLD`` seconds: at least 10 MiB/s of a flood is still
    read, the rest waits in the child's pipe (which then blocks the child's
    writes: nothing is lost), and the loop's restarts, timers and replies
    come first. Measured (docs/benchmarks.md, "Loop lag"): a 1 GB flood
    beside 200 crash-looping programs took 47% of a core on the loop,
    paced 38%, the same as without the flood.

    On a machine with CPU to spare the probe is never late and a flood is
    read as fast as the child writes. A run that ended is drained at full
    speed (``PipePump.unpace``). One pacer per loop (``pacer``).
    """

    PROBE = 0.025  # seconds between the probes, while a pipe floods
    LATE = 0.002  # how late the probe may run ...
    STREAK = 3  # ... this many times in a row before floods give way
    HOLD = 2.0  # seconds floods give way after a late probe
    PAUSE = 0.025  # a flooding pipe's rest after each full chunk, meanwhile
    REPORT_EVERY = 60.0  # at most one log line per this many seconds

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.until = -1.0  # loop.time() until which floods give way
        self.pauses = 0  # rests taken, all told
        self._handle: asyncio.TimerHandle | None = None
        self._flooded = False  # a full chunk since the last probe
        self._streak = 0  # late probes in a row
        self._reported: float | None = None  # loop.time() of the last log line

    def flooding(self) -> bool:
        """A pipe handed over a full chunk: whether it should rest now."""
        self._flooded = True
        if self._handle is None:
            self._handle = self._loop.call_later(self.PROBE, self._probe)
        return self._loop.time() < self.until

    def observe(self, late: float) -> None:
        """The probe ran ``late`` seconds after it was due."""
        if late <= self.LATE:
            self._streak = 0
            return
        self._streak += 1
        if self._streak < self.STREAK:
            return
        now = self._loop.time()
        self.until = now + self.HOLD
        if self._reported is None or now - self._reported >= self.REPORT_EVERY:
            self._reported = now
            logger.info(
                "the event loop ran {:.0f} ms late: output that floods is read at a "
                "slower pace for {:g}s, its writer waits (nothing is lost)",
                1000 * late,
                self.HOLD,
            )

    def _probe(self) -> None:
        handle, self._handle = self._handle, None
        assert handle is not None
        self.observe(self._loop.time() - handle.when())
        if self._flooded:  # else no pipe floods: the probe stops until one does
            self._flooded = False
            self._handle = self._loop.call_later(self.PROBE, self._probe)


_pacers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BulkPacer] = (
    weakref.WeakKeyDictionary()
)


def pacer(loop: asyncio.AbstractEventLoop) -> BulkPacer:
    """The loop's BulkPacer (made at its first use)."""
    found = _pacers.get(loop)
    if found is None:
        found = _pacers[loop] = BulkPacer(loop)
    return found


class PipePump:
    """One of a child's output pipes, read on the loop: each chunk goes to
    ``feed``; at its end (EOF, a read error, ``close``) ``at_end`` is called
    and ``done`` resolved.

    What asyncio's pipe transport (``connect_read_pipe``) would do, without
    its loop turns: three to connect (connection_made, the reader, the
    waiter) and two at EOF, per pipe and run, where a crash loop of 200
    programs starts a hundred runs a second."""

    def __init__(
        self,
        pipe: IO[bytes],
        feed: Callable[[bytes], None],
        done: asyncio.Future[None],
        at_end: Callable[[], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._pipe: IO[bytes] | None = pipe
        self._fd = pipe.fileno()
        self._feed, self._done, self._at_end = feed, done, at_end
        self._pacer: BulkPacer | None = pacer(self._loop)  # None: read at full speed
        self._rest: asyncio.TimerHandle | None = None  # the reader is off until then
        os.set_blocking(self._fd, False)
        self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO and the like: the pipe is over for us
            logger.warning("reading a child's output failed: {}", exc)
            data = b""
        if not data:
            self.close()
            return
        try:
            self._feed(data)
        except Exception as exc:  # a bug in what consumes the output: stop reading
            logger.opt(exception=exc).error("handling a child's output failed")
            self.close()
            return
        if len(data) == READ_SIZE and self._pacer is not None and self._pipe is not None:
            self._give_way(self._pacer)

    def _give_way(self, pace: BulkPacer) -> None:
        """A full chunk: the pipe floods. Rest if the loop runs late (BulkPacer)."""
        if pace.flooding():
            pace.pauses += 1
            self._loop.remove_reader(self._fd)
            self._rest = self._loop.call_later(pace.PAUSE, self._go_on)

    def _go_on(self) -> None:
        self._rest = None
        if self._pipe is not None:
            self._loop.add_reader(self._fd, self._read_ready)

    def unpace(self) -> None:
        """Read at full speed from now on (the run is over: drain it)."""
        self._pacer = None
        if self._rest is not None:
            self._rest.cancel()
            self._go_on()

    def close(self) -> None:
        """Stop reading and close the pipe (done at EOF by itself)."""
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        if self._rest is not None:  # resting: the reader is off already
            self._rest.cancel()
            self._rest = None
        else:
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError):
            pipe.close()
        if self._at_end is not None:
            self._at_end()
        if not self._done.done():
            self._done.set_result(None)


@dataclass
class RunPipes:
    """One run's pipes set apart from the program's current run (an overlap
    restart: the old process keeps writing while its replacement starts)."""

    transports: list[PipePump]
    done: list[asyncio.Future[None]]
    tail: Tail | None = None  # the run's own stderr tail

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for both pipes to reach EOF, then close them."""
        pending = [fut for fut in self.done if not fut.done()]
        for transport in self.transports:
            transport.unpace()  # what is left of the run is read at full speed
        if pending:  # (usually both ended with the child: no wait, no loop turn)
            await asyncio.wait(pending, timeout=timeout)
        self.close()

    def close(self) -> None:
        """Stop reading the pipes."""
        for transport in self.transports:
            transport.close()
        self.transports, self.done = [], []


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
        self._pipes = RunPipes([], [])  # the current run's
        self._idle: asyncio.TimerHandle | None = None  # closes the files IDLE_CLOSE after a run

    async def attach(self, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        """Open the log files (re-created if they or log_dir vanished) and start
        pumping a new child's pipes (the previous run's must be detached)."""
        loop = asyncio.get_running_loop()
        self._keep_files()
        self.stdout.file.open()
        self.stderr.file.open()
        try:
            for pipe, stream in ((stdout, self.stdout), (stderr, self.stderr)):
                done: asyncio.Future[None] = loop.create_future()
                at_end = stream.echo.flush if stream.echo is not None else None
                feed, tail = stream.run_feed()
                if tail is not None:
                    self._pipes.tail = tail
                self._pipes.transports.append(PipePump(pipe, feed, done, at_end))
                self._pipes.done.append(done)
        except BaseException:
            self._pipes.close()  # no reader left behind on a pipe the caller closes
            raise

    async def drain(self, timeout: float) -> None:
        """Wait for both pipes to reach EOF (so a crash's last words are read), then
        close them; a descendant that keeps the pipe open cannot hold us longer than ``timeout``."""
        await self._pipes.drain(timeout)
        self.detach()

    def hand_over(self) -> RunPipes:
        """Set the current run's pipes apart (they keep feeding the log files,
        and their own tail), so that the next run can attach while this one still runs."""
        pipes, self._pipes = self._pipes, RunPipes([], [])
        return pipes

    def adopt(self, pipes: RunPipes) -> None:
        """Make pipes set apart the current run's again (its replacement failed)."""
        self._keep_files()  # (a write re-opens a closed file anyway: this spares it)
        self._pipes.transports += pipes.transports
        self._pipes.done += pipes.done
        self._pipes.tail = self.stderr.tail = pipes.tail
        pipes.transports, pipes.done = [], []

    def detach(self) -> None:
        """Stop reading the run's pipes; the log files close ``IDLE_CLOSE`` later
        unless the next run has attached by then."""
        self._pipes.close()
        self.stdout.untap_all()  # a tap lasts one run
        self.stderr.untap_all()
        if self.stdout.echo is not None:
            self.stdout.echo.flush()
        if self.stderr.echo is not None:
            self.stderr.echo.flush()
        if self._idle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (gosup is ending): close now
                self._close_files()
                return
            self._idle = loop.call_later(IDLE_CLOSE, self._close_files)

    def _keep_files(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _close_files(self) -> None:
        self._idle = None
        self.stdout.file.close()
        self.stderr.file.close()

    def set_rotation(self, max_size: int, backups: int) -> None:
        """New ``[logs]`` settings (a reload), from the next write on."""
        for stream in (self.stdout, self.stderr):
            stream.file.max_size, stream.file.backups = max_size, backups

    def close(self) -> None:
        self.detach()
        self._keep_files()
        self._close_files()
