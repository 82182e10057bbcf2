"""`gosup logs` (issue 17.1) and the client commands' output as an operator
meets it (17.4): the history table's columns, and a reader that goes away.

Against a real `gosup run` whose program writes to both streams (a small
Python program: it prints numbered lines, so order and losses show), real
rotations (logs.max_size of a few KiB) and real pipes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Gosup, wait_for

Factory = Callable[..., Gosup]

# Prints "out N" on stdout and "err N" on stderr for N in 0..COUNT-1, a pair
# every DELAY seconds, then sleeps until stopped.
WRITER = textwrap.dedent(
    """
    import sys, time
    count, delay = int(sys.argv[1]), float(sys.argv[2])
    for i in range(count):
        print(f"out {i}", flush=True)
        print(f"err {i}", file=sys.stderr, flush=True)
        if delay:
            time.sleep(delay)
    print("done", file=sys.stderr, flush=True)
    time.sleep(1000)
    """
)


def writer_toml(count: int, delay: float = 0.0, max_size: str = "1KiB", backups: int = 20) -> str:
    argv = json.dumps([sys.executable, "-c", WRITER, str(count), str(delay)])
    return (
        f'[programs.api]\ncommand = {argv}\nstart_seconds = "100ms"\n'
        f'[programs.api.logs]\nmax_size = "{max_size}"\nbackups = {backups}\n'
    )


def logs(g: Gosup, *args: str) -> subprocess.CompletedProcess[str]:
    return g.cli("logs", "api", *args, timeout=60)


def wrote_all(g: Gosup, count: int = 500) -> bool:
    """Both files hold the last lines (gosup drains the two pipes independently)."""
    ends = {"stdout": f"out {count - 1}\n", "stderr": "done\n"}
    files = {s: g.log_dir / f"api.{s}.log" for s in ends}
    return all(f.exists() and f.read_text().endswith(ends[s]) for s, f in files.items())


def numbers(lines: list[str], prefix: str) -> list[int]:
    return [int(line.removeprefix(prefix)) for line in lines if line.startswith(prefix)]


def test_the_last_lines_of_both_streams_across_rotations(gosup_factory: Factory) -> None:
    g = gosup_factory(writer_toml(500, delay=0.0005))
    g.start()
    wait_for(lambda: wrote_all(g), 30, "the program's output")
    # Rotated at 1 KiB (~127 lines; a chunk read at once may overshoot into the
    # new file), so the last 450 lines always span the current file and .1 at least.
    assert (g.log_dir / "api.stdout.log.1").exists()
    assert len((g.log_dir / "api.stdout.log").read_bytes().splitlines()) < 450

    r = logs(g, "-n", "5")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    out = [f"out | out {i}" for i in range(495, 500)]
    err = [f"err | err {i}" for i in range(496, 500)] + ["err | done"]
    # Two blocks, the file gosup wrote to last at the bottom.
    first, _ = sorted(
        ("out", "err"), key=lambda s: (g.log_dir / f"api.std{s}.log").stat().st_mtime_ns
    )
    assert lines == (out + err if first == "out" else err + out)

    r = logs(g, "--stdout", "-n", "450")
    assert r.stdout.splitlines() == [f"out {i}" for i in range(50, 500)]  # unmarked, in order
    r = logs(g, "--stderr", "-n", "2")
    assert r.stdout == "err 499\ndone\n"

    g.stop()  # the files are read directly: no gosup needed
    r = logs(g, "--stdout", "-n", "3")
    assert r.returncode == 0 and r.stdout == "out 497\nout 498\nout 499\n"


def test_a_line_split_by_a_rotation_is_shown_whole(tmp_path: Path) -> None:
    """gosup rotates between two chunks of a pipe, and a chunk may end mid-line
    (seen with a Python writer: `out 318` closed one file, its newline began
    the next). Before, the tail showed the two halves as two lines. Files cut
    at random places, line-aligned or not, read back as the lines written."""
    import random

    from supervisor.cli import logs as logs_cli

    rng = random.Random(17)
    lines = [f"out {i}".encode() for i in range(300)]
    blob = b"".join(line + b"\n" for line in lines)
    for trial in range(200):
        cuts = sorted(rng.sample(range(1, len(blob)), rng.randrange(0, 6)))
        parts = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
        current = tmp_path / f"t{trial}.stdout.log"
        for k, part in enumerate(reversed(parts)):
            (current if k == 0 else logs_cli.rotated(current, k)).write_bytes(part)
        n = rng.randrange(0, 320)
        with open(current, "rb") as f:
            got = logs_cli.tail((f, current.stat().st_size), current, n)
        assert got == (lines[-n:] if n else []), (trial, n, [len(p) for p in parts])


def test_usage_errors(gosup_factory: Factory) -> None:
    g = gosup_factory(writer_toml(1))
    r = logs(g)
    assert r.returncode == 1 and "no output of 'api'" in r.stderr
    r = g.cli("logs", "../../etc/passwd")
    assert r.returncode == 2 and "not a program name" in r.stderr
    r = g.cli("logs", "api", "--stdout", "--stderr")
    assert r.returncode == 2


def test_follow_across_rotations_loses_nothing(gosup_factory: Factory) -> None:
    """-f while the program writes steadily and its files rotate every ~100 lines."""
    g = gosup_factory(writer_toml(3000, delay=0.001))
    g.start()
    wait_for(lambda: (g.log_dir / "api.stdout.log").exists(), 20, "the log file")
    out = g.dir / "followed"
    with open(out, "wb") as f:
        follower = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "logs", "api", "-f", "-n", "0"],
            cwd=g.dir,
            stdout=f,
            stderr=subprocess.PIPE,
        )
    try:
        wait_for(lambda: "err | done" in out.read_text(), 90, "the last line followed")
    finally:
        follower.terminate()
        follower.wait(10)
        assert follower.stderr is not None
        follower.stderr.close()
    lines = out.read_text().splitlines()
    for prefix in ("out | out ", "err | err "):
        seen = numbers(lines, prefix)
        assert seen, lines[:5]
        # From wherever following began, every line once and in order.
        assert seen == list(range(seen[0], 3000)), prefix
        assert seen[0] < 2500
    assert (g.log_dir / "api.stdout.log.5").exists()  # it did rotate, many times


def _on_a_terminal(argv: list[str], cwd: Path) -> bytes:
    """Run a gosup command with a pseudo-terminal as stdout; what it printed."""
    import pty

    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "supervisor", *argv],
            cwd=cwd,
            stdout=follower,
            stderr=subprocess.PIPE,
        )
        os.close(follower)
        data = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            data += chunk
        p.wait(30)
        assert p.stderr is not None
        assert p.returncode == 0, p.stderr.read()
        p.stderr.close()
        return data
    finally:
        os.close(leader)


def test_logs_escape_control_characters_on_a_terminal_only(gosup_factory: Factory) -> None:
    code = 'import sys, time\nsys.stdout.write("a\\x1b]0;pwned\\x07b\\tc\\x1b[2J\\n")\n'
    code += "sys.stdout.flush()\ntime.sleep(1000)\n"
    argv = json.dumps([sys.executable, "-c", code])
    g = gosup_factory(f"[programs.api]\ncommand = {argv}\n")
    g.start()
    log = g.log_dir / "api.stdout.log"
    wait_for(lambda: log.exists() and log.read_bytes().endswith(b"\n"), 20, "the output")
    raw = b"a\x1b]0;pwned\x07b\tc\x1b[2J"
    shown = _on_a_terminal(["logs", "api", "--stdout"], g.dir)
    assert shown.replace(b"\r\n", b"\n") == b"a\\x1b]0;pwned\\x07b\tc\\x1b[2J\n"
    shown = _on_a_terminal(["logs", "api", "--stdout", "--raw"], g.dir)
    assert raw in shown
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", "logs", "api", "--stdout"],
        cwd=g.dir,
        capture_output=True,
        timeout=60,
    )
    assert r.stdout == raw + b"\n"  # into a pipe: the bytes as written


# -- the history table and closed pipes (17.4) ---------------------------------------------


def test_history_columns_fit_long_program_names(gosup_factory: Factory) -> None:
    """Before: a name of 13+ characters ran into the EVENT column."""
    prog = '[programs.{name}]\ncommand = ["/bin/sleep", "1000"]\nstart_seconds = "100ms"\n'
    g = gosup_factory(prog.format(name="node_exporter") + prog.format(name="api"))
    g.start()
    g.running_pid("node_exporter")
    g.running_pid("api")
    r = g.cli("history")
    assert r.returncode == 0, r.stderr
    header, *rows = r.stdout.splitlines()
    column = header.index("EVENT")
    assert column >= len("node_exporter")
    for row in rows:
        program, event = row[26:column].rstrip(), row[column:].split()[0]
        assert row[column - 2 : column] == "  ", row  # two spaces between the columns
        assert event in ("supervisor_started", "started", "running"), row
        assert program in ("-", "api", "node_exporter"), row


def _history_file(directory: Path, n: int) -> Path:
    state = directory / "state"
    state.mkdir()
    rec = {"ts": "2026-01-01T00:00:00.000Z", "program": "api", "event": "running", "pid": 1}
    (state / "history.jsonl").write_text((json.dumps(rec) + "\n") * n)
    return state


@pytest.mark.parametrize("command", ["history", "history -f", "logs", "logs -f", "status"])
def test_a_reader_that_goes_away_ends_the_command_quietly(
    gosup_factory: Factory, command: str
) -> None:
    """`gosup history | head`: before, a BrokenPipeError traceback. Now nothing
    on stderr and exit 141 (128 + SIGPIPE, as `git log | head` ends)."""
    g = gosup_factory(writer_toml(20_000, max_size="64MiB"))
    state = _history_file(g.dir, 20_000)
    if command.startswith("status"):
        g.start()
        g.running_pid("api")
        argv = ["status"]
    elif command.startswith("history"):
        argv = ["history", "--state-dir", str(state), "-n", "20000"]
    else:
        g.log_dir.mkdir()
        (g.log_dir / "api.stdout.log").write_text("".join(f"out {i}\n" for i in range(20_000)))
        argv = ["logs", "api", "-n", "20000"]
    argv += command.split()[1:]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line is written
    try:
        started = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "supervisor", *argv],
            cwd=g.dir,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert r.stderr == "" and r.returncode == 141, (r.returncode, r.stderr[-2000:])
    assert time.monotonic() - started < 60
