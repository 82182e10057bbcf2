"""``[supervisor] nice``: gosup's session outweighs its programs' sessions
when the CPUs are all taken (issue 18, loop lag under stress), and only
when the session is gosup's alone and gosup may lower it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import wait_for

from supervisor.service import cpuweight

SLEEPER = '[programs.s]\ncommand = ["sleep", "60"]\n'


def _autogroup_nice(pid: int) -> int | None:
    return cpuweight.session_nice(Path(f"/proc/{pid}/autogroup"))


def test_gosup_leading_its_session_outweighs_its_programs(gosup_factory: Any) -> None:
    g = gosup_factory(SLEEPER).start(session=True)
    try:
        child = g.running_pid("s")
        before = _autogroup_nice(child)
        if os.geteuid() == 0:
            assert _autogroup_nice(g.pid) == -10
            assert "gosup's session runs at nice -10 (autogroup), its programs' at 0" in g.log()
        else:  # lowering a nice value needs root or CAP_SYS_NICE: said, not done
            assert _autogroup_nice(g.pid) == 0
            wait_for(lambda: "needs root or CAP_SYS_NICE" in g.log(), 10, "the reason")
        assert before == 0, "a program's session must keep the default weight"
        assert os.getsid(child) == child != os.getsid(g.pid)
    finally:
        assert g.stop() == 0


def test_a_higher_nice_is_applied_without_privilege(gosup_factory: Any) -> None:
    g = gosup_factory("[supervisor]\nnice = 5\n" + SLEEPER).start(session=True)
    try:
        g.running_pid("s")
        assert _autogroup_nice(g.pid) == 5
    finally:
        assert g.stop() == 0


def test_a_gosup_sharing_its_session_leaves_it_alone(gosup_factory: Any) -> None:
    ours = _autogroup_nice(os.getpid())
    g = gosup_factory("[supervisor]\nnice = 7\n" + SLEEPER)  # (unprivileged: it could)
    g.args = [*g.args, "-v"]
    g.start()  # in the tests' session, as `gosup run` typed in a shell
    try:
        g.running_pid("s")
        assert _autogroup_nice(g.pid) == _autogroup_nice(os.getpid()) == ours != 7
        assert "nice = 7 not applied: gosup does not lead its session" in g.log()
    finally:
        assert g.stop() == 0


def test_weigh_session_outcomes(tmp_path: Path) -> None:
    group = tmp_path / "autogroup"
    assert cpuweight.weigh_session(-10, group)[0] == "INFO"  # no file: said
    assert "no autogroups" in cpuweight.weigh_session(-10, group)[1]
    group.write_text("/autogroup-7 nice -10\n")
    assert cpuweight.weigh_session(-10, group) == (
        "INFO",
        "gosup's session runs at nice -10 (autogroup), its programs' at 0",
    )
    group.write_text("/autogroup-7 nice 0\n")
    # This test's process does not lead its session: nothing is written.
    out = _weigh_in_a_child(group, session=False)
    assert out.startswith("DEBUG|[supervisor] nice = -10 not applied: gosup does not lead"), out
    assert group.read_text() == "/autogroup-7 nice 0\n"
    # Leading its session, it writes the value (here into a plain file).
    out = _weigh_in_a_child(group, session=True)
    assert out.startswith("INFO|gosup's session runs at nice -10"), out
    assert group.read_text() == "-10"


def test_the_default_autogroup_is_not_mistaken_for_no_autogroups(tmp_path: Path) -> None:
    """A session started by no setsid since boot (PID 1's, a CI runner's) is
    in the kernel's default group: its /proc/PID/autogroup is empty, not
    missing. gosup sharing such a session says it does not lead it; leading
    one (which setsid would have given its own group) it says why not."""
    group = tmp_path / "autogroup"
    group.write_text("")
    out = _weigh_in_a_child(group, session=False)
    assert out.startswith("DEBUG|[supervisor] nice = -10 not applied: gosup does not lead"), out
    out = _weigh_in_a_child(group, session=True)
    assert out.startswith("INFO|[supervisor] nice = -10 not applied: gosup's session is in"), out
    assert "the kernel's default autogroup" in out, out
    assert group.read_text() == ""


def _weigh_in_a_child(group: Path, session: bool) -> str:
    """``weigh_session(-10, group)`` in a child process, leading its own
    session or not: "LEVEL|message"."""
    probe = (
        "import sys; from pathlib import Path; from supervisor.service import cpuweight;"
        "print(*cpuweight.weigh_session(-10, Path(sys.argv[1])), sep='|')"
    )
    return subprocess.run(
        [sys.executable, "-c", probe, str(group)],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=session,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    ).stdout.strip()
