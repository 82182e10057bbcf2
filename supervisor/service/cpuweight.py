"""gosup's share of the CPU against its own programs: ``[supervisor] nice``.

Linux schedules a process in the root cgroup by its session's *autogroup*
first: each session gets an equal share, whatever its threads' nice values.
gosup starts every program in a session of its own, so 200 crash-looping
programs are 200 sessions, and gosup's session (its event loop and its
spawn thread together) got one 201st of a busy machine: its timers ran up
to 50 ms late and a healthy program's restart waited for a CPU (issue 18,
bench/loop_lag.py). The loop was ready to run, not busy: it waited in the
run queue a quarter of the time.

So gosup lowers its own session's autogroup nice (``/proc/self/autogroup``,
sched(7)), -10 by default: about nine times a program session's weight.
Its programs' sessions stay at 0, each program's processes keep their own
nice values, and gosup takes only what it uses (its loop costs a few
percent of a core, 40% under that crash loop): the weight only decides who
runs first when everything wants a CPU.

Applied only where it is gosup's alone and can work:

- gosup leads its session (systemd's services do; ``gosup run`` typed in a
  shell does not, and must not raise the shell's session);
- lowering a nice value needs root or CAP_SYS_NICE;
- autogroups are on (``kernel.sched_autogroup_enabled``). Where gosup's
  cgroup has the cpu controller (most containers, a systemd unit with
  ``CPUWeight=``), the kernel weighs cgroups instead and this has no effect:
  gosup and its programs share that cgroup's weight.

Each outcome is one log line at start.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTOGROUP = Path("/proc/self/autogroup")
AUTOGROUP_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")


def session_nice(path: Path = AUTOGROUP) -> int | None:
    """The autogroup nice of our session ("/autogroup-N nice K"); None if unknown."""
    try:
        return int(path.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def weigh_session(nice: int, path: Path = AUTOGROUP) -> tuple[str, str]:
    """Set our session's autogroup nice to ``nice``: (log level, what to log).
    Not applied because gosup shares its session is a debug line (each
    ``gosup run`` in a shell); any other outcome is worth an info line."""
    if not path.exists():
        return "INFO", "[supervisor] nice: this kernel has no autogroups (no /proc/self/autogroup)"
    current = session_nice(path)
    if current == nice:
        return "INFO", f"gosup's session runs at nice {nice} (autogroup), its programs' at 0"
    if os.getsid(0) != os.getpid():
        return "DEBUG", (
            f"[supervisor] nice = {nice} not applied: gosup does not lead its session "
            "(started from a shell), which it would raise with it"
        )
    if current is None:
        # The kernel prints nothing for a task outside any autogroup: a
        # session no setsid has made since boot (PID 1's) stays in the
        # default group, which has no weight of its own to set.
        return "INFO", (
            f"[supervisor] nice = {nice} not applied: gosup's session is in "
            "the kernel's default autogroup (empty /proc/self/autogroup)"
        )
    try:
        path.write_text(str(nice))
    except PermissionError:
        return "INFO", (
            f"[supervisor] nice = {nice} not applied: lowering it needs root or CAP_SYS_NICE; "
            f"gosup's session stays at nice {current}"
        )
    except OSError as exc:
        return "INFO", f"[supervisor] nice = {nice} not applied: {exc}"
    off = _read(AUTOGROUP_ENABLED) == "0"
    note = " (autogroups are off in this kernel: no effect)" if off else ""
    return "INFO", f"gosup's session runs at nice {nice} (autogroup), its programs' at 0{note}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
