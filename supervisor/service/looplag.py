"""``gosup_event_loop_lag_seconds``: how late the event loop runs a timer.

Everything gosup does for its programs (signals, restarts, the control
socket, the watchdog ping) runs on one event loop, and DESIGN §1 says that
loop never waits on anything that can stall. This is how an operator sees
whether that holds: a timer asks to run every ``INTERVAL`` seconds, and how
much later than asked it ran is observed into a histogram. A loop that a
blocking write, a slow scan or a CPU-bound parse held up shows it here,
before the systemd watchdog kills gosup for it.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram

INTERVAL = 0.1
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLag:
    """A ``call_later`` chain that measures its own lateness."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.histogram = Histogram(
            "gosup_event_loop_lag_seconds",
            "How much later than asked the event loop ran a timer (asked every 100 ms).",
            registry=registry,
            buckets=BUCKETS,
        )
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = loop.call_at(loop.time() + INTERVAL, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._handle is not None
        self.histogram.observe(max(loop.time() - self._handle.when(), 0.0))
        self._schedule(loop)
