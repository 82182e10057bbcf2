"""`gosup status` with many programs (issue 18, scale): the reply of a
thousand programs read whole however it arrives, the table the same as
before it was built column by column, the socket found from a large app.toml
without tomllib. Real sockets, real processes; the speed itself is measured
by bench/scale.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import status
from supervisor.cli.client import _simple_state_dir


def _programs(n: int) -> list[dict[str, Any]]:
    progs = []
    for i in range(n):
        p: dict[str, Any] = {
            "name": f"p{i:04d}",
            "state": "RUNNING" if i % 7 else "BACKOFF",
            "pid": 1000 + i if i % 7 else None,
            "replacement_pid": None,
            "uptime_s": i * 37.5 if i % 7 else None,
            "restarts": i % 3,
            "failures": 0,
            "last_exit": None if i % 5 else {"exit_code": 2, "signal": None},
            "rss_bytes": 6_000_000 + i if i % 2 else None,
            "goroutines": None,
            "threads": 6,
        }
        progs.append(p)
    progs[3]["last_exit"] = {"exit_code": 1, "output_tail": "bad \x1b[2J thing\n"}
    progs[4]["name"] = "evil\u202e"
    progs[8]["over_limit"], progs[8]["sustain"] = {"rss": 2}, 3
    return progs


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A control socket that answers every request line with the next queued
    reply, written in small pieces (as a busy gosup's socket may hand it over)."""
    path = tmp_path / "gosup.sock"
    replies: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while replies:
                    while b"\n" not in buf:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        buf += chunk
                    _, _, buf = buf.partition(b"\n")
                    reply = replies.pop(0)
                    for i in range(0, len(reply), 7001):
                        conn.sendall(reply[i : i + 7001])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, replies
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(10)


def _gosup(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_a_thousand_programs_arrive_whole_and_print_as_a_table(
    server: tuple[Path, list[bytes]], tmp_path: Path
) -> None:
    path, replies = server
    progs = _programs(1000)
    reply = {"ok": True, "data": {"programs": progs, "supervisor": {"pid": 1}}}
    replies.append(json.dumps(reply).encode() + b"\n")
    r = _gosup(tmp_path, "status", "--socket", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout == status.format_status(progs) + "\n"
    lines = r.stdout.splitlines()
    assert len(lines) == 1001
    header = lines[0].split()
    assert header[:5] == ["NAME", "STATE", "PID", "UPTIME", "RESTARTS"], header
    assert "RSS" in header and "THREADS" in header and "GOROUTINES" not in header
    assert header[-1] == "NOTE"
    # Columns line up: every row's STATE starts where the header's does.
    at = lines[0].index("STATE")
    assert all(line[at - 2 : at] == "  " and line[at] != " " for line in lines[1:])
    assert all(line == line.rstrip() for line in lines)
    # A program's words are shown, never sent to the terminal.
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
    assert "bad \\x1b[2J thing" in lines[4] and lines[5].startswith("evil\\u202e ")
    assert "over rss 2/3" in lines[9]


def test_the_table_is_the_one_it_was(tmp_path: Path) -> None:
    """The column-by-column table against the row-by-row one it replaced
    (kept here as the reference), on the same thousand programs."""

    def by_rows(programs: list[dict[str, Any]]) -> str:
        figures = [
            (k, t) for k, t in status.FIGURE_COLUMNS if any(p.get(k) is not None for p in programs)
        ]
        notes = [status.format_note(p) for p in programs]
        header = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", *(t for _, t in figures)]
        header += ["LAST EXIT", *(["NOTE"] if any(notes) else [])]
        rows = [header]
        for p, note in zip(programs, notes, strict=True):
            cells = [
                str(p["name"]),
                str(p["state"]),
                "-" if p.get("pid") is None else str(p["pid"]),
                status.format_duration(p.get("uptime_s")),
                "-" if p.get("restarts") is None else str(p["restarts"]),
                *(status._figure(k, p.get(k)) for k, _ in figures),
                status.format_exit(p.get("last_exit")),
                *([note or "-"] if any(notes) else []),
            ]
            rows.append([status.escape(c) for c in cells])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )

    progs = _programs(1000)
    for case in (progs, progs[:1], [], [dict(p, over_limit=None) for p in progs[10:20]]):
        assert status.format_status(case) == by_rows(case)


def test_the_reply_is_read_to_its_newline_only(server: tuple[Path, list[bytes]]) -> None:
    """Two replies on one connection, each cut in pieces: each request gets its own."""
    from types import SimpleNamespace

    from supervisor.cli.client import connect

    path, replies = server
    big = {"ok": True, "data": {"blob": "x" * 300_000}}
    replies += [json.dumps(big).encode() + b"\n", b'{"ok": true, "data": 2}\n']
    with connect(SimpleNamespace(socket=str(path), config="app.toml"), 20) as conn:
        assert conn.request("status") == big
        assert conn.request("status") == {"ok": True, "data": 2}


def test_the_socket_is_guessed_from_a_thousand_program_file(tmp_path: Path) -> None:
    """state_dir found without tomllib wherever [supervisor] sits in a large
    app.toml, and only there: the same answer the line-by-line guess gave."""
    one = '\n[programs.p{0}]\ncommand = ["/bin/x", "[supervisor]"]\n'
    one += "[programs.p{0}.logs]\nbackups = 1\n"
    programs = "".join(one.format(i) for i in range(1000))
    head = '[supervisor]\nstate_dir = "run/a"\n'
    assert _simple_state_dir(head + programs) == "run/a"
    assert _simple_state_dir(programs + "\n" + head) == "run/a"
    assert _simple_state_dir(programs) == ".gosup"  # never spelled: the default
    unsure = _simple_state_dir.__globals__["_UNSURE"]
    assert _simple_state_dir(programs + '\nstate_dir = "run/b"\n') is unsure  # under a program
    assert _simple_state_dir(head + programs + "\n" + head) is unsure  # twice
    # End to end: nobody answers at the guessed socket, so the file is parsed
    # whole, and the socket it names is the one reported.
    (tmp_path / "app.toml").write_text(programs + "\n" + head)
    r = _gosup(tmp_path, "status")
    assert r.returncode == 3, r.stderr
    assert str(tmp_path / "run" / "a" / "gosup.sock") in r.stderr
