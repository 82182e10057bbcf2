"""gosup's own log, written so that a reader who stops reading cannot stop gosup.

gosup logs to stderr: a terminal, a pipe into ``less``, or journald under
systemd. Any of them can stop taking bytes (a paused ``less``, a journald
backlog), and a plain ``write`` then blocks the one event loop that sends
signals, restarts programs, answers the control socket and pings the
systemd watchdog (DESIGN §1). So the log sink only appends to a bounded
queue, and a thread of its own does the writing:

- the caller never waits (a lock held for a ``deque`` append, nothing more);
- when ``limit`` bytes are waiting, further messages are dropped and
  counted, and once the reader takes bytes again the count is written in
  their place (``gosup: 1234 log messages dropped: stderr was not being read``);
- at exit the queue gets ``close(timeout)`` to drain, and no more: a reader
  that never comes back cannot keep gosup from ending.

Stdlib only. The terminal echo of the programs' output (``core/output.py``)
has the same problem and may share this writer once both live where each
layer can import them.
"""

from __future__ import annotations

import collections
import os
import select
import threading

QUEUE_LIMIT = 1 << 20  # bytes waiting for the reader before messages are dropped


class QueuedWriter:
    """Writes to file descriptor ``fd`` from a thread; ``write`` never blocks."""

    def __init__(self, fd: int, limit: int = QUEUE_LIMIT, what: str = "stderr") -> None:
        self.fd = fd
        self.limit = limit
        self.what = what
        self.dropped = 0  # messages dropped since the start
        self._unreported = 0  # dropped since the last note about it
        self._queue: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="gosup-log-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Bytes queued and not written yet."""
        with self._cond:
            return self._size

    def write(self, data: bytes) -> bool:
        """Queue ``data`` (one whole message); False when it was dropped."""
        with self._cond:
            if self._closed:
                return False
            note = self._note()
            if self._size + len(note) + len(data) > self.limit:
                self.dropped += 1
                self._unreported += 1
                return False
            if note:
                self._push(note)
                self._unreported = 0
            self._push(data)
            self._cond.notify()
        return True

    def close(self, timeout: float = 1.0) -> None:
        """Let the queue drain for up to ``timeout`` seconds, then stop."""
        with self._cond:
            if self._unreported and (note := self._note()):
                self._push(note)
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _note(self) -> bytes:
        if not self._unreported:
            return b""
        n = self._unreported
        return f"gosup: {n} log messages dropped: {self.what} was not being read\n".encode()

    def _push(self, data: bytes) -> None:
        self._queue.append(data)
        self._size += len(data)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                data = self._queue.popleft()
                self._size -= len(data)
            self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:  # someone made the descriptor non-blocking
                select.select([], [self.fd], [], 1.0)
            except OSError:  # the reader is gone for good (EPIPE): nothing to tell
                return
