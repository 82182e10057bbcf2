"""The loop never waits on anything that can stall (DESIGN §1, issue 15.7).

Each test runs a real code path (a real Program with a real goapp child, a
real ConfigSync, the real pids.json writer, the real instance-name check)
while the blocking call underneath it is made slow: a psutil walk of /proc,
a dump written or read back, a config file hashed and fsynced, pids.json
written into a FIFO nobody reads, a connect to a socket whose queue is
full. A heartbeat task on the loop notes the longest gap between its ticks:
work done on the loop shows up there as a gap as long as the slow call,
work done in a thread does not. The slow call takes SLOW seconds and the
gap allowed is half of that, so a loaded machine has room. (On the code
before these moved off the loop, each test saw a gap of 1 to 2 s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_resources import free_port

from supervisor import config as configmod
from supervisor import fileops
from supervisor.cli.stage import stage_file
from supervisor.core import spawn
from supervisor.core.program import CommandError, Program, Restart, Start, Stop
from supervisor.core.states import ProcessState
from supervisor.files import configswap
from supervisor.files.configsync import ConfigSync
from supervisor.health import evidence
from supervisor.health.evidence import Dumps
from supervisor.health.probes import Prober
from supervisor.service import control, orphans
from supervisor.service.daemon import Supervisor

S = ProcessState
SLOW = 1.0  # seconds each blocking call is made to take
GAP = SLOW / 2  # the longest loop gap allowed while it runs
WAIT = 30.0  # any wait for a program's state, on a loaded machine


class Heartbeat:
    """A task ticking every 10 ms on the loop; ``max_gap`` is its longest silence."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    async def __aenter__(self) -> Heartbeat:
        self._task = asyncio.get_running_loop().create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def check(self, what: str) -> None:
        print(f"{what}: longest loop gap {self.max_gap:.3f}s")  # the figure for the report
        assert self.max_gap < GAP, f"{what}: the loop stalled {self.max_gap:.2f}s"


def slowed(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[float]:
    """Make ``owner.name`` sleep SLOW seconds before doing its work; the list
    collects when it was called (so a test knows the slow path ran)."""
    original = getattr(owner, name)
    calls: list[float] = []

    def slow(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        time.sleep(SLOW)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow)
    return calls


async def until(cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


class Running:
    """A Supervisor's programs (real goapp children) without the rest of gosup."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def program(self, name: str = "api") -> Program:
        return self.sup.programs[name]

    def history(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = self.sup.history.path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if event is None or r["event"] == event]

    def events(self) -> list[str]:
        return [r["event"] for r in self.history()]

    async def running(self, name: str = "api", count: int = 1) -> int:
        """The pid of the program once it has been RUNNING ``count`` times."""

        def ran() -> bool:
            return len(self.history("running")) >= count and self.program(name).state is S.RUNNING

        await until(ran, f"{name} running (#{count})")
        pid = self.program(name).pid
        assert pid is not None
        return pid


def app(goapp: Path, *args: str, extra: str = "", files: str = "", stop: str = "5s") -> str:
    argv = ", ".join(json.dumps(a) for a in (str(goapp), *args))
    return (
        '[supervisor]\nstate_dir = "state"\n'
        f'[programs.api]\ncommand = [{argv}]\nstart_seconds = "100ms"\nstop_timeout = "{stop}"\n'
        f'{extra}\n[programs.api.backoff]\ninitial = "100ms"\njitter = 0.0\n{files}'
    )


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, text: str, attach: Callable[[Supervisor, Program], Any] | None = None
) -> AsyncIterator[Running]:
    config = configmod.loads(text, tmp_path / "app.toml")
    sup = Supervisor(config)
    attachments = []
    try:
        for spec in config.programs:
            program = Program(spec, sup.ctx)
            sup.programs[spec.name] = program
            if attach is not None:
                att = attach(sup, program)
                await att.start()
                attachments.append(att)
            program.launch()
            program.post(Start())
        yield Running(sup)
    finally:
        for program in sup.programs.values():
            with contextlib.suppress(CommandError):
                async with asyncio.timeout(WAIT):
                    await program.request(Stop(reason="test", join=True))
        for att in attachments:
            await att.close()
        for program in sup.programs.values():
            await program.close()
        sup.history.close()


# -- 1. the process-tree snapshot of a stop -----------------------------------------------


@pytest.mark.parametrize("how", ["stop", "kill after stop_timeout"])
def test_a_stop_walks_the_process_tree_off_the_loop(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Before a stop gosup takes the child's tree (/proc reads for every
    process of it, ``spawn.children``), and SIGKILLs what is left of it after
    stop_timeout: /proc can stall (a process in D state), so never on the loop."""
    args = ["-ignore-term"] if how != "stop" else []

    async def main() -> None:
        text = app(goapp, *args, stop="300ms" if how != "stop" else "5s")
        async with running(tmp_path, text) as r:
            await r.running()
            walks = slowed(monkeypatch, spawn, "children")
            async with Heartbeat() as beat:
                async with asyncio.timeout(WAIT):
                    await r.program().request(Stop())
            assert walks, "the stop never walked the tree"
            stopped = r.history("stopped")[-1]
            assert stopped["killed"] is (how != "stop")
            beat.check(f"stop ({how})")

    asyncio.run(main())


def test_an_overlap_restart_walks_the_old_tree_off_the_loop(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overlap restart stops the old process beside the new one (core/overlap.py
    ``Retiring``): its tree is taken before its stop signal, like any stop's."""

    async def main() -> None:
        async with running(tmp_path, app(goapp, extra='restart_mode = "overlap"')) as r:
            old = await r.running()
            walks = slowed(monkeypatch, spawn, "children")
            async with Heartbeat() as beat:
                async with asyncio.timeout(WAIT):
                    await r.program().request(Restart())
                await until(lambda: r.history("stopped"), "the old process stopped")
            assert walks
            assert r.history("stopped")[-1]["pid"] == old
            assert r.program().pid not in (None, old)
            beat.check("overlap restart")

    asyncio.run(main())


# -- 2. evidence: dumps written and read back -----------------------------------------------


def test_a_sigquit_dump_is_written_and_read_back_off_the_loop(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SIGQUIT dump is written when the run is over and read back (does it
    hold stacks?) before ``evidence_saved``: both on a slow disk, neither on the
    loop, and still in order: the dump is recorded before the next start."""

    async def main() -> None:
        async with running(tmp_path, app(goapp)) as r:
            pid = await r.running()
            dumps = Dumps(r.sup.history, r.sup.config.supervisor.state_dir / "dumps")
            writes = slowed(monkeypatch, evidence, "write_dump")
            reads = slowed(monkeypatch, evidence, "verdict")
            async with Heartbeat() as beat:
                async with asyncio.timeout(WAIT):
                    await dumps.restart_with_sigquit(r.program(), pid, "operator")
                await r.running(count=2)
            assert writes and reads
            events = r.events()
            i = events.index("restart_requested")
            assert events[i : i + 6] == [
                "restart_requested", "stopping", "exited", "stopped", "evidence_saved", "started",
            ]  # fmt: skip
            assert text_of(r.history("evidence_saved")[0]["path"]).startswith("SIGQUIT: quit")
            beat.check("SIGQUIT dump")

    asyncio.run(main())


def test_a_pprof_dump_is_read_back_off_the_loop(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gosup dump`: the dump fetched over pprof is read back and the oldest
    pruned before it is recorded; on a slow disk that must not hold the loop."""
    port = free_port()
    metrics = f'[programs.api.limits]\ngo_metrics = "http://127.0.0.1:{port}/metrics"\n'

    async def main() -> None:
        text = app(goapp, "-http", f"127.0.0.1:{port}") + metrics
        async with running(tmp_path, text) as r:
            await r.running()
            dumps = Dumps(r.sup.history, r.sup.config.supervisor.state_dir / "dumps")
            reads = slowed(monkeypatch, evidence, "verdict")
            prunes = slowed(monkeypatch, evidence, "prune_dumps")
            async with Heartbeat() as beat:
                reply = await until(_fetched(dumps, r.program()), "a goroutine dump over pprof")
            assert reads and prunes
            assert text_of(reply["path"]).startswith("goroutine ")
            assert r.history("evidence_saved")[0]["path"] == reply["path"]
            beat.check("pprof dump")

    asyncio.run(main())


def text_of(path: str) -> str:
    return Path(path).read_text()


def _fetched(dumps: Dumps, program: Program) -> Callable[[], Any]:
    """A poll that asks for a dump until one comes (the HTTP server may still be starting)."""
    box: dict[str, Any] = {}
    pending: list[asyncio.Task[Any]] = []

    def poll() -> Any:
        if pending and pending[0].done():
            task = pending.pop()
            if task.exception() is None:
                box["reply"] = task.result()
        if "reply" in box:
            return box["reply"]
        if not pending:
            pending.append(asyncio.get_running_loop().create_task(dumps.on_request(program)))
        return None

    return poll


# -- 3. a config rollback -------------------------------------------------------------------

V0 = b"version 0\n"
POISON = b"version bad\npoison\n"


def test_a_config_rollback_hashes_and_restores_off_the_loop(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged version that kills the program is rolled back from the state
    listener: the previous version is hashed, restored and its directory
    fsynced. All of that off the loop, and still before the next run starts:
    that run must read the restored file."""
    (tmp_path / "config").mkdir()
    live = tmp_path / "config" / "app.conf"
    live.write_bytes(V0)
    signals = tmp_path / "sig"
    files = '[[programs.api.config_files]]\npath = "config/app.conf"\nprobation = "20s"\n'

    def attach(sup: Supervisor, program: Program) -> ConfigSync:
        return ConfigSync(sup.history, program, {}, sup.config.supervisor.state_dir, Prober)

    def loaded() -> list[bytes]:
        text = signals.read_text() if signals.exists() else ""
        return [line.encode() for line in text.splitlines() if line.startswith("config: ")]

    async def main() -> None:
        text = app(goapp, "-config", str(live), "-signal-file", str(signals), files=files)
        async with running(tmp_path, text, attach) as r:
            await r.running()
            hashes = slowed(monkeypatch, configswap, "sha256_or_none")
            syncs = slowed(monkeypatch, fileops, "fsync_dir")
            new = tmp_path / "new.conf"
            new.write_bytes(POISON)
            async with Heartbeat() as beat:
                await asyncio.to_thread(stage_file, new, live.with_name(live.name + ".new"))
                await until(lambda: r.history("config_rolled_back"), "the rollback")
                await r.running(count=2)
            assert hashes and syncs
            assert live.read_bytes() == V0
            rec = r.history("config_rolled_back")[0]
            assert rec["reason"] == "exited" and rec["restored_sha256"] == fileops.sha256_bytes(V0)
            events = r.events()
            exited, rolled = events.index("exited"), events.index("config_rolled_back")
            second_start = [i for i, e in enumerate(events) if e == "started"][1]
            assert exited < rolled < second_start, events
            assert fileops.sha256_bytes(V0).encode() in loaded()[-1]  # the new run read V0
            beat.check("config rollback")

    asyncio.run(main())


# -- 4. pids.json ---------------------------------------------------------------------------


@contextlib.contextmanager
def reader_after(fifo: Path, delay: float) -> Iterator[list[bytes]]:
    """A thread that opens ``fifo`` for reading after ``delay`` seconds (so a
    writer blocked on it goes on) and keeps what it reads."""
    got: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        if stop.wait(delay):
            return
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    time.sleep(0.01)
                    continue
                if not chunk and got:
                    return  # the writer closed its end
                if chunk:
                    got.append(chunk)
                else:
                    time.sleep(0.01)  # no writer yet
        finally:
            os.close(fd)

    thread = threading.Thread(target=read, name="fifo-reader")
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join(WAIT)


def test_pids_json_is_written_off_the_loop(tmp_path: Path) -> None:
    """pids.json is rewritten at every start and exit; a write that blocks (here
    into a FIFO nobody reads yet) must not hold the loop, and the change made
    meanwhile is written once it can be."""
    path = tmp_path / "pids.json"
    fifo = path.with_name(path.name + ".tmp")  # where the writer writes first
    os.mkfifo(fifo)
    pids = orphans.PidFile(path)

    async def main() -> None:
        with reader_after(fifo, SLOW) as got:
            async with Heartbeat() as beat:
                pids.on_record({"event": "started", "program": "api", "pid": os.getpid()})
                await until(lambda: got, "the first write to come through the FIFO")
                pids.on_record({"event": "exited", "program": "api", "pid": os.getpid()})
                await until(lambda: path.is_file() and not fifo.exists(), "the second write")
                await until(lambda: json.loads(path.read_text())["programs"] == {}, "no programs")
            await pids.drain()
        first = json.loads(b"".join(got))
        assert first["programs"]["api"]["pid"] == os.getpid()
        beat.check("pids.json")

    asyncio.run(main())


# -- 5. is another gosup holding the instance name? -----------------------------------------


def test_the_instance_name_check_does_not_hold_the_loop(tmp_path: Path) -> None:
    """At start gosup asks whoever holds the state_dir's instance name who it
    is (``control._name_holder``). The worst holder is one whose accept queue
    is full: a blocking connect would wait there. The probe's connect has a
    timeout, which makes the socket non-blocking, and a Unix socket's connect
    to a full queue then fails at once (EAGAIN) instead of waiting: the loop
    never waits, and the holder counts as one that does not answer."""
    name = control.instance_name(tmp_path)
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(name)
    holder.listen(0)
    fillers = []
    try:
        while True:  # fill its queue: the next connect blocks
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            fillers.append(s)
            try:
                s.connect(name)
            except BlockingIOError:
                break

        async def main() -> None:
            async with Heartbeat() as beat:
                await asyncio.sleep(0.05)
                assert control.claim_instance_name(tmp_path) is None
                await asyncio.sleep(0.05)
            beat.check("instance name check")

        asyncio.run(main())
    finally:
        for s in fillers:
            s.close()
        holder.close()
