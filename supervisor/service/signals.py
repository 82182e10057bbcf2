"""Signals into the loop, and out of it without a window where they kill.

asyncio's ``loop.add_signal_handler`` does what gosup needs while it runs,
but its removal (``remove_signal_handler``, and ``loop.close`` for any left)
puts back the kernel's default: SIGTERM, SIGHUP and SIGUSR1 then end the
process, SIGINT raises KeyboardInterrupt. A stop signal that arrived while
gosup closed (every program already stopped, the history not yet closed)
killed it before ``supervisor_stopped`` was written, or made it exit 130: a
systemd stop that repeats SIGTERM, or an operator's second Ctrl-C a moment
late, was enough.

So gosup routes signals itself, the way asyncio does underneath: a Python
handler that does nothing (the C handler is what matters), and the
interpreter's wakeup fd, a socket the loop reads; each byte read is a signal
number, handed to its callback on the loop. Nothing runs inside a handler.
``ignore`` then swaps a handler for SIG_IGN in one ``sigaction``: there is
no moment at which the default action applies.

Only the main thread may set handlers and the wakeup fd (``ValueError``
elsewhere, as with asyncio's). One router per process: the interpreter has
one wakeup fd, so asyncio's own ``add_signal_handler`` must not be used
beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable
from typing import Any

Callback = Callable[[int], object]
# Ignored by Python itself at start, and given back to children by Popen.
_LEFT_ALONE = frozenset({signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGXFSZ})


def _caught(signum: int, frame: Any) -> None:
    """The Python-level handler: nothing to do, the wakeup fd carries the signal."""


class SignalRouter:
    """Hands signals to callbacks on the loop; see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callbacks: dict[int, Callback] = {}
        self._previous: dict[int, Any] = {}  # handlers before ours, for ``release``
        self._quiet: set[int] = set()  # caught without a callback (``catch_ignored``)
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        try:
            # A full socket (a flood of signals the loop has not read yet)
            # drops bytes: a signal that repeats one not yet handled.
            self._previous_fd = signal.set_wakeup_fd(
                self._writer.fileno(), warn_on_full_buffer=False
            )
        except ValueError:
            self._close_sockets()
            raise
        loop.add_reader(self._reader.fileno(), self._read)
        self._open = True

    def on(self, sig: int, callback: Callback) -> None:
        """Call ``callback(sig)`` on the loop at each ``sig``."""
        self._callbacks[sig] = callback
        self._quiet.discard(sig)
        previous = signal.signal(sig, _caught)
        self._previous.setdefault(sig, previous)
        signal.siginterrupt(sig, False)  # a system call in a thread is restarted, not failed

    def catch_ignored(self) -> list[int]:
        """Catch, and do nothing at, every signal this process was started
        ignoring; returns them.

        An ignored signal stays ignored across fork and exec, and a child
        would start ignoring it too: a shell script's background job starts
        with SIGINT and SIGQUIT ignored, nohup with SIGHUP. gosup catches
        SIGINT and SIGHUP itself, but not SIGQUIT or SIGTSTP, say: a program
        that sets no handler of its own would keep ignoring them, and sh
        cannot even trap a signal that was ignored when it started, so
        ``gosup signal QUIT`` to a wrapper script did nothing. A caught signal
        is reset to its default in the child at exec, and gosup goes on doing
        nothing at it. SIGPIPE and SIGXFSZ stay as Python set them (Popen
        gives them back to children). A later ``on`` for one of them takes
        it over."""
        caught: list[int] = []
        for sig in sorted(signal.valid_signals()):
            if sig in _LEFT_ALONE or sig in self._callbacks:
                continue
            try:
                if signal.getsignal(sig) != signal.SIG_IGN:
                    continue
                previous = signal.signal(sig, _caught)
            except (OSError, ValueError):  # one the kernel or Python will not hand over
                continue
            self._previous.setdefault(sig, previous)
            self._quiet.add(sig)
            signal.siginterrupt(sig, False)
            caught.append(int(sig))
        return caught

    def ignore(self, sig: int) -> None:
        """From now on ``sig`` does nothing at all (never its default action)."""
        signal.signal(sig, signal.SIG_IGN)
        self._callbacks.pop(sig, None)

    def release(self, sig: int) -> None:
        """Give ``sig`` back the handler it had before ``on``."""
        self._callbacks.pop(sig, None)
        if sig in self._previous:
            signal.signal(sig, self._previous.pop(sig))

    def close(self) -> None:
        """Stop reading; handlers still ours are released, ignored ones stay ignored."""
        if not self._open:
            return
        self._open = False
        for sig in [*self._callbacks, *self._quiet]:
            self.release(sig)
        self._quiet.clear()
        self._loop.remove_reader(self._reader.fileno())
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._previous_fd)
        self._close_sockets()

    def _read(self) -> None:
        while True:
            try:
                data = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            for signum in data:
                callback = self._callbacks.get(signum)
                if callback is not None:
                    callback(signum)

    def _close_sockets(self) -> None:
        self._reader.close()
        self._writer.close()
