"""The sampler's rounds (issue 18, "Loop lag under stress"): a state change
costs the sampler the programs that changed, not every program; a reload
(a new programs mapping) and a due sample still go over all of them; a new
run's /proc files are first read by its first sample, while it is still
gosup's."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from supervisor.core.observations import Observations
from supervisor.core.states import ProcessState
from supervisor.health import resources, sampling
from supervisor.health.resources import ResourceSampler

S = ProcessState


@dataclass
class FakeProgram:
    """What the sampler reads of a Program."""

    name: str
    state: ProcessState = S.STOPPED
    pid: int | None = None
    spec: Any = field(default_factory=lambda: SimpleNamespace(limits=None))
    observations: Observations = field(default_factory=Observations)
    ctx: Any = field(default_factory=lambda: SimpleNamespace(clock=lambda: 0.0))


class Rig:
    def __init__(self, count: int) -> None:
        self.programs: dict[str, Any] = {f"p{i}": FakeProgram(f"p{i}") for i in range(count)}
        self.sampler = ResourceSampler(lambda: self.programs, leaks=None)  # type: ignore[arg-type]
        self.synced: list[str] = []
        original = self.sampler._sync_one

        def counting(name: str, program: Any, now: float) -> Any:
            self.synced.append(name)
            return original(name, program, now)

        self.sampler._sync_one = counting  # type: ignore[method-assign]

    def change(self, name: str, state: ProcessState, pid: int | None) -> None:
        program = self.programs[name]
        old, program.state, program.pid = program.state, state, pid
        self.sampler.on_state(program, old, state)


async def _settled(rig: Rig) -> None:
    for _ in range(5):  # the sampler's task runs its round in these turns
        await asyncio.sleep(0)


def _run(test: Callable[[Rig], Awaitable[None]], count: int = 300) -> None:
    async def main() -> None:
        rig = Rig(count)
        await rig.sampler.start()
        try:
            await _settled(rig)
            await test(rig)
        finally:
            await rig.sampler.close()

    asyncio.run(main())


def test_a_state_change_syncs_only_the_program_that_changed() -> None:
    async def check(rig: Rig) -> None:
        assert len(rig.synced) == 300  # the first round: every program
        rig.synced.clear()
        for pid in range(1000, 1020):  # p7 crash-loops: twenty runs
            rig.change("p7", S.STARTING, pid)
            await _settled(rig)
            one = rig.sampler.sampled["p7"]
            assert one.tree is not None and one.tree.pid == pid
            rig.change("p7", S.BACKOFF, None)
            await _settled(rig)
            assert rig.sampler.sampled["p7"].tree is None  # the ended run is forgotten
        assert set(rig.synced) == {"p7"} and len(rig.synced) == 40

    _run(check)


def test_a_new_mapping_syncs_every_program_and_drops_the_removed() -> None:
    async def check(rig: Rig) -> None:
        rig.change("p1", S.RUNNING, 4242)
        await _settled(rig)
        rig.synced.clear()
        # A reload: p0 removed, p1 replaced by a new Program, the rest kept.
        rig.programs = {n: p for n, p in rig.programs.items() if n != "p0"}
        old_p1 = rig.programs["p1"]
        rig.programs["p1"] = FakeProgram("p1", S.RUNNING, 4343)
        rig.change("p2", S.STARTING, 4444)  # any state change wakes the sampler
        await _settled(rig)
        assert len(rig.synced) == 299
        assert "p0" not in rig.sampler.sampled
        one = rig.sampler.sampled["p1"]
        assert one.program is not old_p1 and one.tree is not None and one.tree.pid == 4343

    _run(check)


def test_a_new_run_is_first_read_by_its_first_sample() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        tree = sampling.ProcessTree(child.pid, look=False)
        tree.refresh({child.pid: []})
        assert tree.procs == {}  # nothing read yet
        figures = tree.sample(sockets=False)
        # (rss may still read 0 this soon after the exec: not asserted)
        assert figures is not None and figures["threads"] == 1 and figures["open_fds"] >= 3
        assert list(tree.procs) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert tree.sample(sockets=False) is None  # gone: and its pid is never read as ours again


def test_a_run_that_ended_is_never_sampled_under_its_old_pid() -> None:
    child = subprocess.Popen(["sleep", "60"])

    async def check(rig: Rig) -> None:
        rig.change("p3", S.RUNNING, child.pid)
        await _settled(rig)
        one = rig.sampler.sampled["p3"]
        tree = one.tree
        assert tree is not None and tree.unread
        program = rig.programs["p3"]
        program.pid, program.state = None, S.EXITED  # reaped; no round has run yet
        rig.sampler._sample([one], 0.0)
        assert tree.unread and tree.procs == {}  # not read: the pid may be anyone's now
        program.pid, program.state = child.pid, S.RUNNING
        rig.sampler._sample([one], 0.0)
        assert child.pid in tree.procs
        assert program.observations.figures["threads"] == 1

    try:
        _run(check, count=5)
    finally:
        child.kill()
        child.wait()


def test_the_first_sample_is_still_scheduled_after_a_start() -> None:
    async def check(rig: Rig) -> None:
        loop = asyncio.get_running_loop()
        rig.change("p4", S.RUNNING, 999_999)
        await _settled(rig)
        due = rig.sampler.sampled["p4"].next_due - loop.time()
        assert 0 < due <= resources.FIRST_SAMPLE

    _run(check, count=5)
