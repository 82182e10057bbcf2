"""The history under a hostile environment (issue 15): a full disk, a file
renamed or deleted under gosup, a deleted state_dir, a history of tens of
megabytes, a gosup that was SIGKILLed. Real gosup processes, real files, a
real 2 MiB tmpfs for the full disk (root only)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Gosup, fill_disk, pid_alive, wait_for

from supervisor import history as hist
from supervisor.history import History

# -- helpers --------------------------------------------------------------------------


def _crash_loop(goapp: Path, name: str = "flaky", extra: str = "") -> str:
    """A program that exits 1 after 300 ms, forever (never FATAL)."""
    return f"""
        [programs.{name}]
        command = ["{goapp}", "-mode", "exit", "-code", "1", "-after", "300ms"]
        start_seconds = "100ms"
        stop_timeout = "1s"
        [programs.{name}.backoff]
        initial = "50ms"
        max = "100ms"
        give_up_after = 0
        {extra}
        """


def _records(path: Path) -> list[dict[str, Any]]:
    """Every line of one history file, each of which must be a whole record."""
    out = []
    for number, line in enumerate(path.read_bytes().split(b"\n")[:-1], 1):
        rec = hist.parse_line(line)
        assert rec is not None, f"{path}:{number}: torn or garbage line {line[:200]!r}"
        out.append(rec)
    return out


def _all_records(state_dir: Path) -> list[dict[str, Any]]:
    """The current history and its backups, oldest first."""
    path = state_dir / "history.jsonl"
    files = [path]
    index = 1
    while hist.backup_path(path, index).exists():
        files.append(hist.backup_path(path, index))
        index += 1
    return [rec for f in reversed(files) if f.exists() for rec in _records(f)]


def _cli_usage(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], int, int]:
    """Run a gosup command; also return its peak RSS (KiB) and the bytes it
    read (imports included: a few MiB)."""
    probe = (
        "import re, resource, sys\n"
        "from supervisor.gosup import main\n"
        "def rchar():\n"
        "    io = open('/proc/self/io').read()\n"
        "    return int(re.search(r'rchar: (\\d+)', io).group(1))\n"
        "before = rchar()\n"
        "try:\n"
        "    code = main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "read = rchar() - before\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(f'USAGE {rss} {read}', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    usage = [line for line in done.stderr.splitlines() if line.startswith("USAGE ")]
    assert usage, done.stderr
    _, rss, rchar = usage[-1].split()
    return done, int(rss), int(rchar)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:  # between two renames of a rotation
        return None


def _follower(g: Gosup) -> tuple[subprocess.Popen[bytes], Path]:
    """``gosup history -f --json -n 0`` printing into a file, once it follows:
    it holds the history open. (On a loaded machine its start takes seconds; a
    rename done before it opened the file would not be followed, but skipped.)"""
    out = g.dir / f"follow-{time.monotonic_ns()}.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "history", "-f", "--json", "-n", "0"],
            cwd=g.dir,
            stdout=f,
            stderr=subprocess.DEVNULL,
        )
    history = str((g.state_dir / "history.jsonl").resolve())
    try:
        wait_for(lambda: history in _open_files(proc.pid), 30, "the follower to open the history")
    except BaseException:
        proc.kill()
        proc.wait(20)
        raise
    return proc, out


def _open_files(pid: int) -> set[str]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


def _stop_follower(proc: subprocess.Popen[bytes], out: Path) -> list[dict[str, Any]]:
    """Wait until the follower printed gosup's last record, then end it."""
    try:
        wait_for(
            lambda: b'"supervisor_stopped"' in out.read_bytes(), 20, "the follower to catch up"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
    return [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]


def _big_history(path: Path, size: int, program: str = "busy") -> int:
    """Write about ``size`` bytes of plausible records of ``program``; return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {
            "ts": "2026-01-01T00:00:00.000Z",
            "program": program,
            "event": "exited",
            "pid": 12345,
            "exit_code": 1,
            "signal": None,
            "uptime_s": 0.3,
            "output_tail": "x" * 80,
        },
        separators=(",", ":"),
    ).encode()
    count = size // (len(line) + 1)
    block = (line + b"\n") * 10_000
    with open(path, "wb") as f:
        for _ in range(count // 10_000):
            f.write(block)
        f.write((line + b"\n") * (count % 10_000))
        stopped = {"ts": "2026-01-01T00:00:01.000Z", "event": "supervisor_stopped"}
        f.write(json.dumps(stopped, separators=(",", ":")).encode() + b"\n")
    return count + 1


# -- 15.1: a write that fails -------------------------------------------------------------


def test_a_full_disk_never_raises_never_tears_a_line_and_recovers(small_disk: Path) -> None:
    path = small_disk / "state" / "history.jsonl"
    messages: list[str] = []
    with History(path, on_write_error=messages.append) as history:
        history.record("supervisor_started", version="t")
        filler = fill_disk(small_disk)
        # Records of ~300 bytes: one of them crosses the last page and is cut short.
        for i in range(40):
            history.record("exited", "api", pid=i, output_tail="y" * 250)
        assert history.write_errors > 0
        assert history.pending > 0
        assert len(messages) == 1, messages  # one report per burst, not one per record
        _records(path)  # every line whole: a short write was cut back
        filler.unlink()
        history.record("started", "api", pid=99)
        assert history.pending == 0
        assert len(messages) == 2 and "written again" in messages[1]
    recs = _records(path)
    # The records that waited in memory came first, in order, then the new one.
    assert [r.get("pid") for r in recs if r["event"] in ("exited", "started")] == [
        *range(40),
        99,
    ]


def test_a_full_state_dir_degrades_the_history_never_supervision(
    gosup_factory: Any, goapp: Path, small_disk: Path
) -> None:
    state_dir = small_disk / "state"
    config = f'[supervisor]\nstate_dir = "{state_dir}"\n' + _crash_loop(goapp)
    g = gosup_factory(config)
    g.state_dir = state_dir
    g.start()
    g.wait_event("exited", "flaky", count=2)
    filler = fill_disk(small_disk)
    wait_for(lambda: "cannot write the history" in g.log(), 20, "the write error to be logged")
    # The program keeps crash-looping; gosup stays responsive.
    done = g.cli("status", "--json")
    assert done.returncode == 0, done.stderr
    restarts_before = json.loads(done.stdout)["programs"][0]["restarts"]
    wait_for(
        lambda: (
            json.loads(g.cli("status", "--json").stdout)["programs"][0]["restarts"]
            > restarts_before + 3
        ),
        20,
        "restarts to go on while the disk is full",
    )
    assert g.log().count("cannot write the history") == 1  # once per burst
    filler.unlink()
    # Records resume, intact, after the space came back.
    before = len(_records(state_dir / "history.jsonl"))
    wait_for(
        lambda: len(_records(state_dir / "history.jsonl")) > before + 3, 20, "records to resume"
    )
    # gosup's log goes through a queue and a writer thread: wait for the line.
    wait_for(lambda: "is written again" in g.log(), 20, "the recovery to be logged")
    assert "internal error" not in g.log()
    assert g.cli("restart", "flaky").returncode in (0, 1)  # answered, whatever the state
    done = g.cli("stop", "flaky", timeout=20)
    assert done.returncode == 0, done.stdout + done.stderr
    assert g.stop(signal.SIGTERM, timeout=20) == 0
    _records(state_dir / "history.jsonl")
    assert _records(state_dir / "history.jsonl")[-1]["event"] == "supervisor_stopped"


# -- 15.2: rotation, renaming, deletion ---------------------------------------------------


def test_rotation_keeps_backups_and_history_reads_across_them(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(
        '[supervisor]\nhistory_max_size = "4KiB"\nhistory_backups = 2\n' + _crash_loop(goapp)
    )
    g.start()
    follower, followed_file = _follower(g)
    try:
        path = g.state_dir / "history.jsonl"
        wait_for(lambda: hist.backup_path(path, 2).exists(), 60, "two rotations")
        # Rotate once more, so the follower crosses a rotation it did not start on.
        first_backup = _inode(hist.backup_path(path, 1))
        wait_for(
            lambda: _inode(hist.backup_path(path, 1)) not in (first_backup, None), 60, "a rotation"
        )
        assert g.cli("stop", "flaky").returncode == 0  # the files hold still now
        assert not hist.backup_path(path, 3).exists()
        for f in (path, hist.backup_path(path, 1), hist.backup_path(path, 2)):
            assert f.stat().st_size <= 4096
        everything = _all_records(g.state_dir)
        done = g.cli("history", "-n", "40", "--json", "--program", "flaky")
        assert done.returncode == 0, done.stderr
        shown = [json.loads(line) for line in done.stdout.splitlines()]
        assert shown == [r for r in everything if r.get("program") == "flaky"][-40:]
        assert len(shown) == 40
    finally:
        assert g.stop() == 0
        followed = _stop_follower(follower, followed_file)
    # -f printed every record written after it started, across the rotations.
    assert followed[-1]["event"] == "supervisor_stopped"
    tss = [r["ts"] for r in followed]
    assert tss == sorted(tss)
    assert len(followed) > 4096 // 150 * 2  # more than two files' worth


def test_a_history_renamed_or_deleted_under_gosup_is_reopened(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(_crash_loop(goapp)).start()
    path = g.state_dir / "history.jsonl"
    g.wait_event("exited", "flaky")
    follower, followed_file = _follower(g)
    try:
        rotated = g.state_dir / "history.jsonl.old"
        os.rename(path, rotated)  # logrotate without copytruncate
        wait_for(lambda: path.exists() and len(_records(path)) >= 2, 20, "a new history file")
        size = rotated.stat().st_size
        wait_for(lambda: len(_records(path)) >= 4, 20, "more records")
        assert rotated.stat().st_size == size  # the renamed file gets nothing more
        path.unlink()  # and deleted outright
        wait_for(lambda: path.exists() and len(_records(path)) >= 2, 20, "the history again")
    finally:
        assert g.stop() == 0
        followed = _stop_follower(follower, followed_file)
    # The follower kept printing through the rename and the deletion.
    assert followed[-1]["event"] == "supervisor_stopped"
    assert len(followed) >= 6


def test_a_deleted_state_dir_is_made_again_and_keeps_a_second_gosup_out(
    gosup_factory: Any, goapp: Path
) -> None:
    config = _crash_loop(goapp)
    first = gosup_factory(config).start()
    first.wait_event("exited", "flaky")
    # rm -rf, in one step (gosup may write into the directory meanwhile).
    doomed = first.dir / "doomed"
    os.rename(first.state_dir, doomed)
    shutil.rmtree(doomed)
    path = first.state_dir / "history.jsonl"
    wait_for(lambda: path.exists() and len(_records(path)) >= 2, 20, "the history made again")
    assert (first.state_dir.stat().st_mode & 0o777) == 0o700
    second = Gosup(first.dir, config)
    second.err = first.dir / "second.err"
    second.out = first.dir / "second.out"
    second.start()
    assert second.proc is not None
    assert second.proc.wait(30) == 1
    assert "another gosup (pid" in second.err.read_text()
    assert f"pid {first.pid})" in second.err.read_text()
    first.assert_alive()
    # Nothing of the refused gosup in the (new) history.
    assert not [r for r in _records(path) if r["event"] == "supervisor_started"]
    assert first.stop() == 0


# -- reading costs ------------------------------------------------------------------------


@pytest.fixture
def big_history(tmp_path: Path) -> tuple[Path, int]:
    state = tmp_path / ".gosup"
    count = _big_history(state / "history.jsonl", 40 * 1024**2)
    return state, count


def test_reading_the_last_records_costs_what_is_printed(
    big_history: tuple[Path, int], tmp_path: Path
) -> None:
    state, count = big_history
    base = ["history", "--state-dir", str(state), "--json"]
    done, rss_small, read_small = _cli_usage(*base, "-n", "10", cwd=tmp_path)
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 10
    assert read_small < 6 * 1024**2  # bytes read for 10 records of a 40 MiB history

    # Everything: streamed, so memory does not grow with what is printed.
    done, rss_all, _ = _cli_usage(*base, "-n", "1000000", "--max-scan", "0", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.count("\n") == count
    assert rss_all < rss_small + 40 * 1024  # KiB: no list of 200,000 records

    # A program that is not there: the scan stops at --max-scan, and says so.
    done, _, read_rare = _cli_usage(
        *base, "--program", "rare", "-n", "5", "--max-scan", "8MiB", cwd=tmp_path
    )
    assert done.returncode == 0 and done.stdout == ""
    assert "looked no further" in done.stderr
    assert read_rare < 14 * 1024**2


def test_stage_while_gosup_is_down_reads_no_whole_history(
    big_history: tuple[Path, int], tmp_path: Path
) -> None:
    # big_history is this app.toml's state_dir (.gosup), its last record a stop.
    (tmp_path / "app.toml").write_text(
        '[programs.api]\ncommand = ["/bin/true"]\n'
        '[[programs.api.config_files]]\npath = "api.yaml"\n'
    )
    (tmp_path / "api.yaml").write_text("a: 1\n")
    new = tmp_path / "new.yaml"
    new.write_text("a: 2\n")
    done, _, read = _cli_usage("stage", str(new), "api.yaml", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # staged, but nothing confirmed it
    assert "gosup is not running: no verdict" in done.stdout
    assert read < 6 * 1024**2


# -- supervisor_lost ----------------------------------------------------------------------


def test_a_sigkilled_gosup_is_recorded_lost_with_its_programs(
    gosup_factory: Any, goapp: Path
) -> None:
    config = f"""
        [programs.api]
        command = ["{goapp}"]
        start_seconds = "100ms"
        stop_timeout = "1s"
        """
    first = gosup_factory(config).start()
    api = first.running_pid("api")
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    wait_for(lambda: not pid_alive(api), 10, "the program to die with gosup")
    last_ts = first.history()[-1]["ts"]
    second = Gosup(first.dir, config).start()
    try:
        second.wait_event("running", "api", count=2)
        recs = second.history()
        lost = [i for i, r in enumerate(recs) if r["event"] == "supervisor_lost"]
        assert len(lost) == 1
        rec = recs[lost[0]]
        assert rec["pid"] == first.pid and rec["last_ts"] == last_ts
        exits = [r for r in recs if r["event"] == "exited" and r.get("reason") == "lost"]
        assert [(r["program"], r["pid"]) for r in exits] == [("api", api)]
        started = [i for i, r in enumerate(recs) if r["event"] == "supervisor_started"]
        assert lost[0] < started[-1]
    finally:
        assert second.stop() == 0
    # A clean stop is not a loss: the next gosup writes no supervisor_lost.
    third = Gosup(first.dir, config).start()
    try:
        third.wait_event("running", "api", count=3)
        assert len(third.history(event="supervisor_lost")) == 1
    finally:
        assert third.stop() == 0


# -- the socket's history command ---------------------------------------------------------


def test_history_requests_leave_the_default_executor_free(tmp_path: Path) -> None:
    """12 slow history requests (a 60 MiB history, a program not in it) run in
    the history's own thread: work handed to the loop's default executor
    (where configs are applied) runs at once, before any of them is done."""
    from types import SimpleNamespace

    from supervisor.service import control

    path = tmp_path / "history.jsonl"
    _big_history(path, 60 * 1024**2, program="other")
    sup: Any = SimpleNamespace(history=SimpleNamespace(path=path))

    async def main() -> tuple[int, list[Any]]:
        loop = asyncio.get_running_loop()
        # The default pool of a 2-core machine (min(32, cpus + 4) threads).
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(6))
        requests = [
            loop.create_task(
                control.handle_history(sup, control.Request("history", {"program": "api"}))
            )
            for _ in range(12)
        ]
        await asyncio.sleep(0.05)  # every request handed to its executor
        await loop.run_in_executor(None, lambda: None)  # what a config apply does
        done_before = sum(t.done() for t in requests)
        return done_before, await asyncio.gather(*requests)

    done_before, replies = asyncio.run(main())
    assert done_before == 0
    assert all(reply["records"] == [] for reply in replies)
