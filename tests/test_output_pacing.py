"""A flood of output gives way to supervision when the loop runs late
(core/output.py, ``BulkPacer``): it rests between chunks, nothing is lost,
and a run that ended is drained at full speed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from supervisor.core import output, spawn

FLOOD = 64 << 20  # bytes the child writes: 256 full chunks
# A child that writes FLOOD bytes (a counter in each 1 KiB, so order and loss show) and exits.
WRITER = (
    "import sys\n"
    f"data = b''.join(b'%08d' % i + b'.' * 1016 for i in range({FLOOD // 1024}))\n"
    "sys.stdout.buffer.write(data)\n"
)
EXPECTED = b"".join(b"%08d" % i + b"." * 1016 for i in range(FLOOD // 1024))


def flood(
    before: Callable[[output.PipePump, output.BulkPacer], None] = lambda pump, pace: None,
) -> tuple[bytes, output.BulkPacer, list[float]]:
    """Pump a flooding child's stdout to the end (through a 1 MiB pipe, as
    gosup's children have); ``before`` runs once the pump is set up. Returns
    what arrived, the loop's pacer and every lateness its probe observed."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    spawn._widen_pipes(proc)  # type: ignore[arg-type]
    got: list[bytes] = []  # (appended: no copy of what came before, the loop stays on time)
    lates: list[float] = []

    async def main() -> output.BulkPacer:
        loop = asyncio.get_running_loop()
        pace = output.pacer(loop)
        observe = pace.observe

        def watched(late: float) -> None:
            lates.append(late)
            observe(late)

        pace.observe = watched  # type: ignore[method-assign]
        done: asyncio.Future[None] = loop.create_future()
        pump = output.PipePump(proc.stdout, got.append, done)  # type: ignore[arg-type]
        before(pump, pace)
        await asyncio.wait_for(done, 60)
        return pace

    try:
        pace = asyncio.run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    return b"".join(got), pace, lates


def test_a_flood_rests_while_the_loop_runs_late_and_nothing_is_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output.BulkPacer, "HOLD", 600.0)  # late once: gives way to the end
    monkeypatch.setattr(output.BulkPacer, "PAUSE", 0.002)  # (256 rests of 25 ms: too long a test)

    def late_loop(pump: output.PipePump, pace: output.BulkPacer) -> None:
        for _ in range(pace.STREAK):
            pace.observe(0.5)

    got, pace, _ = flood(late_loop)
    assert got == EXPECTED  # every byte, in order
    assert pace.pauses >= 64  # full chunks were followed by a rest


def test_a_flood_is_read_without_rest_while_the_loop_is_on_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output.BulkPacer, "LATE", 3600.0)  # no probe is ever that late
    monkeypatch.setattr(output.BulkPacer, "PROBE", 0.001)  # (probes, however fast the flood)
    got, pace, lates = flood()
    assert got == EXPECTED
    assert lates  # the probe ran while the pipe flooded ...
    assert pace.pauses == 0  # ... and found the loop on time: no rest


def hold_up(times: int, held_for: float) -> Callable[[output.PipePump, output.BulkPacer], None]:
    """From the first full chunk on, keep the loop from its timers (as a busy
    loop would: the stimulus) ``times`` times in a row for ``held_for``
    seconds each. With ``held_for`` over twice the probe's interval, every
    probe meanwhile is due inside a hold-up and runs late."""

    def before(pump: output.PipePump, pace: output.BulkPacer) -> None:
        flooding = pace.flooding
        left = [times]
        started: list[bool] = []
        loop = asyncio.get_running_loop()

        def busy() -> None:
            time.sleep(held_for)
            left[0] -= 1
            if left[0] > 0:
                loop.call_soon(busy)  # (a timer due meanwhile runs first)

        def first_chunk_holds_up() -> bool:
            if not started:
                started.append(True)
                loop.call_soon(busy)
            return flooding()

        pace.flooding = first_chunk_holds_up  # type: ignore[method-assign]

    return before


def test_the_probe_sees_a_busy_loop_and_makes_floods_give_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output.BulkPacer, "PAUSE", 0.002)
    got, pace, lates = flood(hold_up(times=6, held_for=0.06))
    assert got == EXPECTED
    assert sum(late > pace.LATE for late in lates) >= pace.STREAK  # the probe saw it ...
    assert pace.pauses > 0  # ... and the flood gave way


def test_a_resting_pipe_is_read_at_full_speed_once_unpaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output.BulkPacer, "HOLD", 600.0)
    monkeypatch.setattr(output.BulkPacer, "PAUSE", 600.0)  # a rest would outlast the test
    seen: dict[str, Any] = {}

    def late_then_drain(pump: output.PipePump, pace: output.BulkPacer) -> None:
        for _ in range(pace.STREAK):
            pace.observe(0.5)
        loop = asyncio.get_running_loop()

        def drain_when_resting() -> None:
            if pump._rest is None:
                loop.call_later(0.005, drain_when_resting)
                return
            seen["pauses"] = pace.pauses
            pump.unpace()  # what a run's drain does (RunPipes.drain)

        loop.call_soon(drain_when_resting)

    got, pace, _ = flood(late_then_drain)
    assert got == EXPECTED  # read to the end, long before a 600 s rest was over
    assert seen["pauses"] >= 1
    assert pace.pauses == seen["pauses"]  # no rest after the drain began


def test_the_probe_stops_when_nothing_floods() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        pace = output.pacer(loop)
        assert pace is output.pacer(loop)  # one per loop
        assert not pace.flooding()  # on time: no rest; the probe starts
        assert pace._handle is not None
        for _ in range(1000):  # 10 s at most: a poll for the chain's end, with a deadline
            if pace._handle is None:
                break
            await asyncio.sleep(0.01)
        assert pace._handle is None  # a probe with no flood since the last one ends the chain
        pace.observe(1.0)
        assert not pace.flooding()  # late once (one slow write, say): no rest
        pace.observe(0.0)  # on time again: the streak is broken
        for _ in range(pace.STREAK - 1):
            pace.observe(1.0)
        assert not pace.flooding()  # late STREAK times, but not in a row: no rest
        pace.observe(1.0)
        assert pace.flooding()  # late STREAK times in a row: a flooding pipe rests
        pace._handle.cancel()

    asyncio.run(main())
