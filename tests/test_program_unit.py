"""The Program state machine against a fake child and an injected clock.

No real process and no timer wait: the test moves the clock and wakes the
actor, so a 30-second backoff is checked in microseconds, and the exact
moment a deadline fires (not a millisecond early) is observable.

The clock only moves when the actor has settled: a test that moves it while
the actor is still between two steps (the launcher has run, the STARTING
timer is not armed yet) arms that timer past the moved clock, and the run
then never becomes RUNNING. So the harness waits for the actor's settled
state (`started`: record written, timer armed), never for a side effect of
its first step, and every wait has a deadline: a broken actor fails a test
in seconds with the name of what it waited for, instead of hanging it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import BackoffSpec, ProgramSpec, RestartPolicy
from supervisor.core.program import CommandError, Context, Program, Restart, SendSignal, Start, Stop
from supervisor.core.states import ProcessState
from supervisor.history import History

S = ProcessState
WAIT = 10.0  # seconds any wait on the actor may take, even on a loaded machine


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeChild:
    """Quacks like spawn.Child; exits when told to, or on the signals it does not ignore."""

    def __init__(self, pid: int, ignore_term: bool) -> None:
        self.pid = pid
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        r_out, self._w_out = os.pipe()
        r_err, self._w_err = os.pipe()
        self.stdout = os.fdopen(r_out, "rb", 0)
        self.stderr = os.fdopen(r_err, "rb", 0)
        self.ignore_term = ignore_term
        self.signals: list[tuple[str, int]] = []
        self.oom_kills_before: int | None = None  # as spawn.Child: none read before the fork

    def exit(self, code: int, stderr: bytes = b"") -> None:
        if self.exited.done():
            return
        if stderr:
            os.write(self._w_err, stderr)
        os.close(self._w_out)
        os.close(self._w_err)
        self.exited.set_result(code)

    def on_exit(self, fn: Any) -> None:
        self.exited.add_done_callback(lambda fut: fn(fut.result()))

    def signal_group(self, sig: int) -> bool:
        self.signals.append(("group", sig))
        if sig == signal.SIGKILL or not self.ignore_term:
            self.exit(-sig)
        return True

    def send_signal(self, sig: int) -> bool:
        self.signals.append(("main", sig))
        return not self.exited.done()

    def signal_escaped(self, procs: list[Any], sig: int) -> None:
        pass

    def alive(self) -> bool:
        return not self.exited.done()

    def ended_ago(self) -> float:
        return 0.0

    def group_empty(self) -> bool:
        return True

    def group_members(self) -> list[Any]:
        return []

    def tree(self) -> list[Any]:
        return []


class Harness:
    def __init__(self, tmp: Path, **spec_keys: Any) -> None:
        self.clock = FakeClock()
        self.children: list[FakeChild] = []
        self.ignore_term = False
        self.history_path = tmp / "history.jsonl"
        self.history = History(self.history_path)
        ctx = Context(
            history=self.history,
            log_dir=tmp / "logs",
            clock=self.clock,
            rng=random.Random(1),
            launcher=self._launch,
        )
        spec = ProgramSpec(name="api", command=("api",), directory=tmp, **spec_keys)
        self.program = Program(spec, ctx)

    async def _launch(
        self, spec: ProgramSpec, env: dict[str, str], *, at_once: bool = False
    ) -> tuple[Any, str]:
        child = FakeChild(10_000 + len(self.children), self.ignore_term)
        self.children.append(child)
        return child, "f" * 64

    @property
    def child(self) -> FakeChild:
        return self.children[-1]

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        recs = [json.loads(x) for x in self.history_path.read_text().splitlines()]
        return [r for r in recs if event is None or r["event"] == event]

    async def advance(self, seconds: float) -> None:
        """Move the clock and let the actor notice its deadline."""
        self.clock.now += seconds
        self.program._wake.set()
        await self.idle()

    async def idle(self) -> None:
        """Yield until the actor has handled everything and waits for its next
        message (bounded by WAIT, never a fixed sleep). A stop walks the process
        tree in a thread: on a loaded machine that takes any number of loop
        turns, so counting turns is not enough; the actor parked on its inbox is."""
        for _ in range(200):
            await asyncio.sleep(0)
        await self.until(self._parked, "the actor to wait for its next message")

    def _parked(self) -> bool:
        p = self.program
        return not p._inbox and bool(p._wake._waiters)  # type: ignore[attr-defined]

    async def until(self, cond: Callable[[], bool], what: str) -> None:
        """Poll the actor's visible state until ``cond`` holds, with a deadline."""
        try:
            async with asyncio.timeout(WAIT):
                while not cond():  # noqa: ASYNC110 - the actor exposes no event to wait on
                    await asyncio.sleep(0.001)
        except TimeoutError:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None

    async def started(self, n: int) -> FakeChild:
        """Wait until the ``n``-th child runs and the actor has settled in STARTING:
        its ``started`` record written and the start_seconds timer armed. The
        launcher having run is not enough: the actor attaches the child's pipes
        (real loop turns) before it arms the timer from the clock."""

        def settled() -> bool:
            p = self.program
            return (
                len(self.children) == n
                and p.child is self.children[-1]
                and p.state is S.STARTING
                and p._deadline is not None
                and any(r["pid"] == p.child.pid for r in self.records("started"))
            )

        await self.until(settled, f"start #{n} settled in STARTING")
        return self.child

    async def stopping(self) -> None:
        """Wait until the actor has settled in STOPPING: the stop signal sent and
        the stop_timeout timer armed (after the tree walk, which runs in a thread)."""

        def settled() -> bool:
            return self.program.state is S.STOPPING and bool(self.child.signals)

        await self.until(settled, "the stop signal sent")
        await self.idle()

    async def answer(self, reply: Awaitable[str], what: str = "the reply") -> str:
        """Await a command's reply, with a deadline (CommandError passes through)."""
        try:
            async with asyncio.timeout(WAIT):
                return await reply
        except TimeoutError:
            raise AssertionError(f"timed out after {WAIT}s waiting for {what}") from None


def run(tmp: Path, body: Callable[[Harness], Coroutine[Any, Any, None]], **keys: Any) -> None:
    async def main() -> None:
        h = Harness(tmp, **keys)
        h.program.launch()
        try:
            await body(h)
        finally:
            for child in h.children:
                child.exit(0)
            await h.program.close()
            h.history.close()

    asyncio.run(main())


FAST = BackoffSpec(
    initial=1.0, max=8.0, multiplier=2.0, jitter=0.0, reset_after=60.0, give_up_after=4
)


def test_crash_loop_waits_exactly_the_backoff_then_gives_up(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.program.post(Start())
        expected = [1.0, 2.0, 4.0]
        for n, delay in enumerate(expected, start=1):
            await h.started(n)
            h.child.exit(1)
            await h.until(lambda: h.program.state is S.BACKOFF, "backoff")
            await h.advance(delay - 0.001)  # not a moment early
            assert h.program.state is S.BACKOFF and len(h.children) == n
            await h.advance(0.001)
            await h.started(n + 1)
        h.child.exit(1)
        await h.until(lambda: h.program.state is S.FATAL, "FATAL")
        assert [r["delay_s"] for r in h.records("backoff")] == expected
        assert h.records("fatal")[0]["attempts"] == 4
        await h.advance(3600)  # FATAL is final
        assert len(h.children) == 4

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)


def test_healthy_run_resets_and_restarts_at_once(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        h.child.exit(1)  # one failed start: failures = 1
        await h.until(lambda: h.program.state is S.BACKOFF, "backoff")
        await h.advance(1.0)
        await h.started(2)
        await h.advance(5.0)
        assert h.program.state is S.RUNNING
        await h.advance(60.0)  # healthy for reset_after
        h.child.exit(2)
        await h.started(3)
        assert h.records("backoff")[-1]["delay_s"] == 0.0
        assert h.program.failures == 0
        assert h.records("started")[-1]["attempt"] == 1

    run(tmp_path, body, backoff=FAST, start_seconds=5.0)


def test_stop_escalates_to_sigkill_at_stop_timeout(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.ignore_term = True
        h.program.post(Start())
        await h.started(1)
        stop = asyncio.ensure_future(h.program.request(Stop()))
        await h.stopping()
        await h.advance(9.999)
        assert h.child.signals == [("group", signal.SIGTERM)]
        await h.advance(0.001)
        await h.answer(stop, "the stop")
        assert h.child.signals[-1] == ("group", signal.SIGKILL)
        assert h.program.state is S.STOPPED
        assert h.records("stopped")[0]["killed"] is True

    run(tmp_path, body, stop_timeout=10.0)


def test_operator_restart_is_not_a_failure(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        await h.advance(1.0)
        reply = asyncio.ensure_future(h.program.request(Restart(reason="operator")))
        await h.started(2)
        await h.advance(1.0)
        assert "running" in await h.answer(reply, "the restart")
        assert h.program.failures == 0
        assert not h.records("backoff")
        assert h.records("restart_requested")[0]["reason"] == "operator"
        assert h.program.restarts["operator"] == 1

    run(tmp_path, body, start_seconds=1.0)


@pytest.mark.parametrize("reason", ["leak", "unhealthy"])
def test_a_leak_restart_after_a_healthy_run_is_not_a_failure(tmp_path: Path, reason: str) -> None:
    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        await h.advance(61.0)  # past backoff.reset_after (60s)
        reply = asyncio.ensure_future(h.program.request(Restart(reason=reason)))
        await h.started(2)
        await h.advance(1.0)
        assert "running" in await h.answer(reply, "the restart")
        assert h.program.failures == 0 and not h.records("backoff")

    run(tmp_path, body, start_seconds=1.0)


@pytest.mark.parametrize("reason", ["leak", "unhealthy"])
def test_a_leak_restart_within_reset_after_is_a_failed_run(tmp_path: Path, reason: str) -> None:
    """DESIGN §3: a limit below the idle baseline must end in FATAL, not loop."""

    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        await h.advance(1.0)
        reply = asyncio.ensure_future(h.program.request(Restart(reason=reason)))
        assert "a failed run" in await h.answer(reply, "the restart")
        assert h.program.state is S.BACKOFF and h.program.failures == 1
        assert h.records("exited")[-1]["reason"] == reason
        assert h.records("backoff")[0]["attempt"] == 1
        assert h.program.restarts[reason] == 1 and not h.program.restarts["crash"]

    run(tmp_path, body, start_seconds=1.0)


def test_conflicting_and_pointless_commands_get_clear_answers(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(CommandError, match="not running"):
            await h.answer(h.program.request(SendSignal(signum=signal.SIGHUP)))
        h.ignore_term = True
        h.program.post(Start())
        await h.started(1)
        first = asyncio.ensure_future(h.program.request(Stop()))
        await h.stopping()
        with pytest.raises(CommandError, match="already stopping"):
            await h.answer(h.program.request(Stop()))
        with pytest.raises(CommandError, match="is stopping"):
            await h.answer(h.program.request(Start()))
        await h.advance(10.0)
        await h.answer(first, "the first stop")
        assert "already stopped" in await h.answer(h.program.request(Stop()))

    run(tmp_path, body, stop_timeout=10.0)


def test_operator_start_leaves_fatal_with_a_fresh_series(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        h.child.exit(1)
        await h.until(lambda: h.program.state is S.FATAL, "FATAL")
        started = asyncio.ensure_future(h.program.request(Start()))
        await h.started(2)
        await h.advance(1.0)
        assert "running" in await h.answer(started, "the start")
        assert h.program.failures == 0

    spec = BackoffSpec(give_up_after=1, jitter=0.0)
    run(tmp_path, body, backoff=spec, start_seconds=1.0)


def test_panic_in_stderr_is_recorded_on_exit(tmp_path: Path) -> None:
    trace = (
        b"panic: boom\n\ngoroutine 1 [running]:\nmain.handler()\n"
        b"\t/src/main.go:42 +0x1d\nexit status 2\n"
    )

    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        h.child.exit(2, stderr=trace)
        await h.until(lambda: h.program.state is S.EXITED, "exited")
        crash = h.records("exited")[0]["crash"]
        assert crash["kind"] == "panic" and crash["message"] == "boom"
        assert "main.handler" in crash["frame"]

    run(tmp_path, body, restart=RestartPolicy.NEVER)


def test_a_restart_for_a_gone_pid_does_not_revive_the_program(tmp_path: Path) -> None:
    """A leak finding for pid N arrives after N crashed into FATAL: nothing restarts."""

    async def body(h: Harness) -> None:
        h.program.post(Start())
        await h.started(1)
        leaking = h.child.pid
        h.child.exit(2)  # the crash wins the race against the leak restart
        await h.until(lambda: h.program.state is S.FATAL, "FATAL")
        with pytest.raises(CommandError, match=f"pid {leaking} is gone"):
            await h.answer(h.program.request(Restart(reason="leak", pid=leaking)))
        assert h.program.state is S.FATAL and len(h.children) == 1
        assert not h.records("restart_requested")

    run(tmp_path, body, backoff=BackoffSpec(give_up_after=1, jitter=0.0))
