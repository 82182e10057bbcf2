"""A crash-looping program keeps its log files open from run to run (issue 18):
opening and closing both files at every run was a stat, two opens, a fstat and
a close per file on the loop for each crash. They close a little after the
program stops, and a log file deleted meanwhile is created again."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from conftest import wait_for


def _log_fds(pid: int, log_dir: Path) -> dict[str, str]:
    """gosup's descriptors on files under log_dir: {fd: file name}."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(str(log_dir)):
                out[fd] = os.path.basename(target)
    return out


def _starts(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_crash_loop_keeps_its_log_files_open_across_runs(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    argv = [str(goapp), "-mode", "exit", "-code", "1", "-after", "50ms",
            "-startfile", str(starts), "-stderr-line", "bye"]  # fmt: skip
    command = ", ".join(f'"{a}"' for a in argv)
    g = gosup_factory(f"""
        [programs.loop]
        command = [{command}]
        restart = "always"
        [programs.loop.backoff]
        initial = "50ms"
        max = "100ms"
        give_up_after = 0
    """).start()
    log = g.log_dir / "loop.stderr.log"
    wait_for(lambda: _starts(starts) >= 2 and log.exists(), 15, "the crash loop")
    first = _log_fds(g.pid, g.log_dir)
    assert sorted(first.values()) == ["loop.stderr.log", "loop.stdout.log"], first
    # Sampled through several runs, exits and backoffs: the same descriptors all along.
    seen_runs = _starts(starts)
    samples = 0
    while _starts(starts) < seen_runs + 5 or samples < 20:
        assert _log_fds(g.pid, g.log_dir) == first
        samples += 1
        g.assert_alive()
    assert log.read_text().count("bye") >= 5
    assert g.cli("stop", "loop", "-c", str(g.config)).returncode == 0
    wait_for(lambda: not _log_fds(g.pid, g.log_dir), 15, "the files closed after the stop")
    assert g.stop() == 0
