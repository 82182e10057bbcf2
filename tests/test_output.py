"""Output capture: files, rotation, terminal prefixing, memory under a flood;
and the history CLI that operators tail."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
from conftest import wait_for
from test_lifecycle import program

from supervisor.core.lines import Head, LineSplitter, Tail
from supervisor.core.output import DroppingWriter

MiB = 1024 * 1024


def test_stdout_and_stderr_go_to_their_files(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(program("talk", goapp, "-stderr-line", "to stderr", "-version", "v9")).start()
    g.running_pid("talk")
    out, err = g.log_dir / "talk.stdout.log", g.log_dir / "talk.stderr.log"
    wait_for(lambda: out.exists() and "version: v9" in out.read_text(), what="stdout line")
    wait_for(lambda: err.exists() and "to stderr" in err.read_text(), what="stderr line")
    assert "to stderr" not in out.read_text()
    assert g.stop() == 0


def test_log_rotation_keeps_backups_and_bounds_size(gosup_factory: Any, goapp: Path) -> None:
    flood = 3_500_000  # 3.5 MB of 100-byte lines through a 1 MiB file with 2 backups
    g = gosup_factory(
        program("flood", goapp, "-mode", "flood", "-flood-bytes", str(flood), restart='"never"')
        + '[programs.flood.logs]\nmax_size = "1MiB"\nbackups = 2\n'
    ).start()
    g.wait_event("exited", "flood")
    assert g.stop() == 0
    base = g.log_dir / "flood.stdout.log"
    files = [base, base.with_name(base.name + ".1"), base.with_name(base.name + ".2")]
    assert all(f.exists() for f in files)
    assert not base.with_name(base.name + ".3").exists()
    # rotated at a line boundary: at most the rest of one 100-byte line past max_size
    assert all(f.stat().st_size <= MiB + 100 for f in files)
    # the newest lines are in the live file, in order, none torn
    lines = base.read_bytes().split(b"\n")[:-1]
    assert lines and all(len(line) == 99 for line in lines)
    # what is kept is the tail of the stream: 3 files' worth, contiguous
    kept = sum(f.stat().st_size for f in files)
    assert kept > 2 * MiB


def test_flood_does_not_grow_gosup_memory(gosup_factory: Any, goapp: Path) -> None:
    total = 300_000_000
    g = gosup_factory(
        program(
            "flood",
            goapp,
            "-mode",
            "flood",
            "-flood-bytes",
            str(total),
            "-after",
            "500ms",
            restart='"never"',
        )
        + '[programs.flood.logs]\nmax_size = "100MiB"\nbackups = 3\n'
    ).start()
    g.wait_event("started", "flood")
    me = psutil.Process(g.pid)
    baseline = me.memory_info().rss
    peak = baseline

    def done() -> bool:
        nonlocal peak
        peak = max(peak, me.memory_info().rss)
        return bool(g.history("flood", "exited"))

    wait_for(done, timeout=120, what="the flood to finish")
    assert g.stop() == 0
    written = sum(f.stat().st_size for f in g.log_dir.glob("flood.stdout.log*"))
    assert total <= written <= total + 200  # every flood byte captured (+ the start line)
    assert peak - baseline < 30 * MiB, f"gosup grew {(peak - baseline) / MiB:.1f} MiB"


def test_echo_prefixes_each_line_with_the_program_name(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(
        program("api", goapp, "-version", "v1") + program("worker", goapp), "--echo"
    ).start()
    wait_for(lambda: "api    | version: v1" in g.out.read_text(), what="prefixed line")
    wait_for(lambda: "worker | start: name=goapp" in g.out.read_text(), what="worker line")
    assert g.stop() == 0


def _history_fixture(gosup_factory: Any, goapp: Path) -> Any:
    g = gosup_factory(
        program("a", goapp, "-mode", "exit", "-code", "4", restart='"never"') + program("b", goapp)
    ).start()
    g.wait_event("exited", "a")
    g.running_pid("b")
    assert g.stop() == 0
    return g


def test_history_table_json_filter_and_n(gosup_factory: Any, goapp: Path) -> None:
    g = _history_fixture(gosup_factory, goapp)
    table = g.cli("history", "-c", str(g.config), "-n", "100")
    assert table.returncode == 0
    assert "exit_code=4" in table.stdout and "supervisor_stopped" in table.stdout
    as_json = g.cli("history", "-c", str(g.config), "--json", "--program", "a", "-n", "100")
    recs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert recs and {r["program"] for r in recs} == {"a"}
    assert [r["event"] for r in recs][:2] == ["started", "exited"]
    last2 = g.cli("history", "--state-dir", str(g.state_dir), "--json", "-n", "2")
    assert [json.loads(x)["event"] for x in last2.stdout.splitlines()][-1] == "supervisor_stopped"
    assert len(last2.stdout.splitlines()) == 2


def test_history_follow_prints_new_records(gosup_factory: Any, goapp: Path, tmp_path: Path) -> None:
    g = gosup_factory(program("x", goapp, autostart="false"))
    out = tmp_path / "follow.out"
    with open(out, "wb") as f:
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "supervisor",
                "history",
                "-c",
                str(g.config),
                "-f",
                "--json",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        g.start()
        wait_for(lambda: b"supervisor_started" in out.read_bytes(), what="followed record")
        assert g.stop() == 0
        wait_for(lambda: b"supervisor_stopped" in out.read_bytes(), what="followed stop")
    finally:
        follower.terminate()
        follower.wait(10)


def test_history_without_a_file_says_so(gosup_factory: Any) -> None:
    g = gosup_factory('[programs.x]\ncommand = ["/bin/true"]\n')
    result = g.cli("history", "-c", str(g.config))
    assert result.returncode == 1
    assert "no history yet" in result.stderr


# -- the bounded stream helpers (core/lines.py) ---------------------------------------


def test_line_splitter_keeps_the_partial_line_and_bounds_it() -> None:
    lines = LineSplitter(max_line=8)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o\n") == [b"two"]
    assert lines.feed(b"0123456789") == [b"0123456789"]  # no end in sight: passed on
    assert lines.feed(b"tail") == []
    assert lines.flush() == [b"tail"]
    assert lines.flush() == []


def test_tail_and_head_keep_their_end_of_the_stream() -> None:
    tail, head = Tail(4), Head(4)
    for chunk in (b"abc", b"defgh", b"ij"):
        tail.feed(chunk)
        head.feed(chunk)
    assert tail.bytes() == b"ghij" and tail.text() == "ghij"
    assert bytes(head.data) == b"abcd" and head.truncated
    tail.clear()
    assert tail.bytes() == b""


def test_log_files_are_0640_in_a_0750_dir_whatever_the_umask(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(program("talk", goapp, "-stderr-line", "hello"))
    old = os.umask(0)  # gosup inherits a careless umask
    try:
        g.start()
    finally:
        os.umask(old)
    log = g.log_dir / "talk.stderr.log"
    wait_for(lambda: log.exists() and "hello" in log.read_text(), what="the log")
    assert stat.S_IMODE(g.log_dir.stat().st_mode) == 0o750
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert stat.S_IMODE((g.log_dir / "talk.stdout.log").stat().st_mode) == 0o640
    assert g.stop() == 0


def test_dropping_writer_never_blocks_and_counts_what_it_dropped() -> None:
    r, w = os.pipe()
    writer = DroppingWriter(w, max_bytes=64 * 1024, label="test")
    try:
        chunk = b"x" * 1023 + b"\n"
        for _ in range(2_000):  # 2 MiB into a pipe nobody reads: returns at once
            writer.write(chunk)
        wait_for(lambda: writer.dropped_bytes > 1_000_000, what="drops counted")
        got = b""
        while b"dropped" not in got:  # the reader catches up: the loss is reported
            got += os.read(r, 1 << 20)
            writer.write(b"after\n")
        assert b"bytes of test dropped" in got
    finally:
        os.close(r)  # the writer's thread sees EPIPE and ends
        writer.close(timeout=5)
        os.close(w)


def test_rotation_never_splits_a_line_that_a_chunk_left_open(tmp_path: Path) -> None:
    """A pipe chunk can end inside a line; if the next chunk has no newline in
    the room left, the old file is finished with the rest of that line (a
    little past max_size) instead of the line being split across two files
    (seen under load: a live file starting with the tail of a torn line)."""
    from supervisor.core.output import RotatingFile

    log = RotatingFile(tmp_path / "x.log", max_size=100, backups=1)
    line = b"L" * 29 + b"\n"  # 30 bytes
    log.write(line * 3 + b"L" * 5)  # 95 bytes: the file now ends inside a line
    log.write(b"L" * 24 + b"\n" + line)  # no newline within the 5 bytes left
    log.close()
    old = (tmp_path / "x.log.1").read_bytes()
    new = (tmp_path / "x.log").read_bytes()
    assert old == line * 4 and new == line  # every line whole, in order
