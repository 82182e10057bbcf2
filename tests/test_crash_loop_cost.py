"""What a crash-loop start costs gosup, taken down without changing what it does
(issue 18, "Loop lag under stress"): the crash's sweep reads gosup's children
once and a candidate's environment raw, a run's pipes are read without
asyncio's transports, log lines are written a burst at a time, and a plain
history record is not parsed back for its listeners."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from conftest import wait_for

from supervisor.core import output, spawn
from supervisor.history import History


def _orphan_like(program: str) -> int:
    """A child of ours that no Popen started (as an orphan adopted by the
    subreaper looks), carrying ``program``'s mark."""
    env = {**os.environ, spawn.PROGRAM_VAR: program}
    return os.posix_spawn("/bin/sleep", ["sleep", "60"], env)


def _end(pid: int) -> None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def test_adopted_matches_the_whole_mark_of_its_program() -> None:
    pids = [_orphan_like("api"), _orphan_like("api2"), _orphan_like("ap")]
    try:
        wait_for(
            lambda: all(b"GOSUP_PROGRAM" in Path(f"/proc/{p}/environ").read_bytes() for p in pids),
            10,
            "the children to exec",
        )
        assert [p.pid for p in spawn.adopted("api")] == [pids[0]]
        assert [p.pid for p in spawn.adopted("api2")] == [pids[1]]
        assert [p.pid for p in spawn.adopted("ap")] == [pids[2]]
        assert spawn.adopted("a") == []
    finally:
        for pid in pids:
            _end(pid)


def test_one_look_reads_gosups_children_once_for_the_block() -> None:
    late = None
    try:
        with spawn.one_look():
            before = spawn.own_children()
            late = _orphan_like("late")
            assert late not in spawn.own_children()  # the first look holds in the block
            assert spawn.adopted("late") == []
        assert late in spawn.own_children() and late not in before  # a fresh look after it
        wait_for(lambda: spawn.adopted("late"), 10, "the child to exec")
        assert [p.pid for p in spawn.adopted("late")] == [late]
    finally:
        if late is not None:
            _end(late)


def test_one_look_is_per_thread() -> None:
    seen: list[set[int]] = []
    with spawn.one_look():
        spawn.own_children()
        pid = _orphan_like("other-thread")
        try:
            thread = threading.Thread(target=lambda: seen.append(spawn.own_children()))
            thread.start()
            thread.join()
            assert pid in seen[0]  # another thread looks for itself
        finally:
            _end(pid)


class _Counting(output.DroppingWriter):
    def __init__(self, fd: int) -> None:
        super().__init__(fd, label="test")
        self.writes = 0

    def _write_all(self, data: bytes) -> bool:
        self.writes += 1
        return super()._write_all(data)


def test_a_burst_of_log_lines_is_written_at_once_and_in_order() -> None:
    r, w = os.pipe()
    writer = _Counting(w)
    try:
        lines = [f"line {i}\n".encode() for i in range(50)]
        for line in lines:
            writer.write(line)
        got = bytearray()
        expected = b"".join(lines)

        def arrived() -> bool:
            got.extend(os.read(r, 65536))
            return len(got) >= len(expected)

        wait_for(arrived, 10, "the lines")
        assert bytes(got) == expected
        assert writer.writes < len(lines)  # one wake-up and write for many lines
    finally:
        writer.close()
        os.close(r)
        os.close(w)


def test_a_pump_hands_over_every_chunk_and_ends_once_at_eof() -> None:
    code = "import sys; sys.stdout.buffer.write(b'x' * 3_000_000); sys.stdout.flush()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, bufsize=0)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    ends: list[int] = []

    async def main() -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        output.PipePump(proc.stdout, chunks.append, done, lambda: ends.append(1))  # type: ignore[arg-type]
        await asyncio.wait_for(done, 30)

    try:
        asyncio.run(main())
    finally:
        proc.wait(30)
    assert sum(map(len, chunks)) == 3_000_000
    assert max(map(len, chunks)) <= output.READ_SIZE
    assert ends == [1]
    assert proc.stdout.closed  # the pipe's fd is not left open


def test_a_record_reads_back_as_it_was_handed_to_its_listeners(tmp_path: Path) -> None:
    history = History(tmp_path / "history.jsonl")
    heard: list[dict[str, object]] = []
    history.add_listener(heard.append)
    plain = history.record("exited", "api", pid=7, exit_code=None, signal="SIGKILL", uptime_s=1.5)
    other = history.record("evidence_saved", "api", path=tmp_path / "d", kind="pprof")
    nested = history.record("fatal", "api", attempts=3, why=("a", "b"))
    history.close()
    lines = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [plain, other, nested] == lines == heard
    assert other["path"] == str(tmp_path / "d") and nested["why"] == ["a", "b"]
