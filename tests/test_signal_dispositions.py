"""A child starts with every signal at its default action, whatever gosup
was started with: a background job of a shell script starts with SIGINT and
SIGQUIT ignored, nohup with SIGHUP ignored, and an ignored signal stays
ignored across exec. gosup catches SIGINT and SIGHUP itself (so those were
always reset), but a signal it does not handle, SIGQUIT say, stayed ignored
in its programs: sh cannot trap a signal that was ignored when it started,
so `gosup signal QUIT` to a wrapper script did nothing. (A CI run started
as a background job failed on exactly that.)"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from conftest import wait_for
from test_lifecycle import program

IGNORED = ("INT", "QUIT", "HUP", "TSTP", "USR2")
TRAPPER = "trap 'echo quitting >&2; exit 0' QUIT; sleep 600 & wait"


def ignored_signals(pid: int) -> set[int]:
    """The signals process ``pid`` ignores (SigIgn in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def caught_signals(pid: int) -> set[int]:
    """The signals process ``pid`` has a handler for (SigCgt)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_children_start_with_the_signals_gosup_was_started_ignoring_at_their_default(
    gosup_factory: Any,
) -> None:
    g = gosup_factory(
        program("sleeper", Path("/bin/sleep"), "600")
        + program("trapper", Path("/bin/sh"), "-c", TRAPPER)
    ).start(ignoring=IGNORED)
    assert g.proc is not None
    asked = {signal.Signals[f"SIG{name}"] for name in IGNORED}
    sleeper = g.running_pid("sleeper")
    # The premise: gosup was started with them ignored (or handles them now).
    assert asked <= ignored_signals(g.proc.pid) | caught_signals(g.proc.pid)
    assert not ignored_signals(sleeper) & asked
    # What that changes: the signals reach the programs.
    trapper = g.running_pid("trapper")
    assert g.cli("signal", "QUIT", "trapper").returncode == 0
    exited = g.wait_event("exited", "trapper")[0]
    assert exited["pid"] == trapper and exited["exit_code"] == 0  # its trap ran
    assert "quitting" in (g.log_dir / "trapper.stderr.log").read_text()
    # gosup itself still ignores what it was started ignoring and does not handle.
    g.proc.send_signal(signal.SIGQUIT)
    g.proc.send_signal(signal.SIGTSTP)
    assert g.cli("status").returncode == 0
    g.assert_alive()
    assert g.stop() == 0


def test_a_signal_gosup_ignored_at_start_is_caught_without_effect(gosup_factory: Any) -> None:
    g = gosup_factory(program("sleeper", Path("/bin/sleep"), "600")).start(ignoring=("QUIT",))
    g.running_pid("sleeper")
    assert g.proc is not None
    for _ in range(3):
        g.proc.send_signal(signal.SIGQUIT)
    wait_for(lambda: g.cli("status").returncode == 0, 20, "gosup to answer")
    g.assert_alive()
    assert g.stop() == 0
