"""Real-process tests of the core: restart policies, backoff, FATAL, crash
classification, stop sequences, signals, bad programs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, pid_alive, wait_for


def ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()


def program(name: str, binary: Path, *args: str, **keys: str) -> str:
    argv = ", ".join(f'"{a}"' for a in (str(binary), *args))
    extra = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return f'[programs.{name}]\ncommand = [{argv}]\nstart_seconds = "200ms"\n{extra}\n'


def test_crash_loop_backs_off_exponentially_then_gives_up(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(
        program("crashy", goapp, "-mode", "exit", "-code", "3")
        + '[programs.crashy.backoff]\ninitial = "100ms"\nmultiplier = 2.0\njitter = 0.0\n'
        "give_up_after = 4\n"
    ).start()
    fatal = g.wait_event("fatal", "crashy")[0]
    assert fatal["attempts"] == 4
    backoffs = g.history("crashy", "backoff")
    assert [b["delay_s"] for b in backoffs] == [0.1, 0.2, 0.4]
    assert [b["attempt"] for b in backoffs] == [1, 2, 3]
    starts = g.history("crashy", "started")
    exits = g.history("crashy", "exited")
    assert len(starts) == len(exits) == 4
    assert all(e["exit_code"] == 3 for e in exits)
    assert [s["attempt"] for s in starts] == [1, 2, 3, 4]
    # the waits really happened: each start follows the previous exit by >= its delay
    for exit_rec, start_rec, b in zip(exits[:-1], starts[1:], backoffs, strict=True):
        assert ts(start_rec) - ts(exit_rec) >= b["delay_s"] - 0.01
    # FATAL is final: nothing starts afterwards
    assert g.stop() == 0
    assert len(g.history("crashy", "started")) == 4


def test_first_restart_after_a_healthy_run_is_immediate(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(
        program("steady", goapp, "-mode", "exit", "-code", "1", "-after", "700ms")
        + '[programs.steady.backoff]\ninitial = "20s"\nreset_after = "300ms"\njitter = 0.0\n'
    ).start()
    starts = g.wait_event("started", "steady", count=2)
    first_exit = g.history("steady", "exited")[0]
    assert first_exit["uptime_s"] >= 0.3
    backoff = g.history("steady", "backoff")[0]
    assert backoff["delay_s"] == 0.0
    # far below the 20 s `initial`: the restart did not wait (room for a loaded machine)
    assert ts(starts[1]) - ts(first_exit) < 10.0
    assert starts[1]["attempt"] == 1
    assert g.stop() == 0


@pytest.mark.parametrize(
    ("mode", "kind", "message"),
    [
        ("panic", "panic", "boom: fixture panic"),
        ("nilderef", "panic", "runtime error: invalid memory address or nil pointer dereference"),
        ("fatal", "fatal_error", "concurrent map writes"),
        ("deadlock", "fatal_error", "all goroutines are asleep - deadlock!"),
        ("segv", "signal", "SIGSEGV: segmentation violation"),
    ],
)
def test_go_crashes_are_classified(
    gosup_factory: Any, goapp: Path, mode: str, kind: str, message: str
) -> None:
    g = gosup_factory(program("app", goapp, "-mode", mode, restart='"never"')).start()
    exited = g.wait_event("exited", "app")[0]
    crash = exited["crash"]
    assert crash["kind"] == kind
    assert crash["message"] == message
    if mode in ("panic", "nilderef"):
        assert "main.crashHere" in crash["frame"]
    assert g.stop() == 0


def test_stop_kills_a_term_ignoring_child_and_its_escaped_grandchild(
    gosup_factory: Any, goapp: Path, tmp_path: Path
) -> None:
    gpid_file = tmp_path / "grandchild.pid"
    g = gosup_factory(
        program(
            "stubborn",
            goapp,
            "-ignore-term",
            "-grandchild",
            "-grandchild-setsid",
            "-grandchild-pidfile",
            str(gpid_file),
            stop_timeout='"500ms"',
        )
    ).start()
    child = g.running_pid("stubborn")
    grandchild = int(wait_for(lambda: gpid_file.exists() and gpid_file.read_text().split()[0]))
    assert pid_alive(child) and pid_alive(grandchild)
    assert g.stop() == 0
    stopped = g.history("stubborn", "stopped")[0]
    assert stopped["killed"] is True
    assert stopped["reason"] == "shutdown"
    assert not pid_alive(child)
    assert not pid_alive(grandchild)


def test_graceful_stop_is_not_killed(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(program("polite", goapp, "-term-delay", "200ms")).start()
    g.running_pid("polite")
    assert g.stop() == 0
    stopped = g.history("polite", "stopped")[0]
    assert stopped["killed"] is False
    exited = g.history("polite", "exited")[0]
    assert exited["exit_code"] == 0


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH])
def test_signals_are_forwarded_to_every_running_program(
    gosup_factory: Any, goapp: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    files = [tmp_path / "a.signals", tmp_path / "b.signals"]
    g = gosup_factory(
        program("a", goapp, "-report-signals", "-signal-file", str(files[0]))
        + program("b", goapp, "-report-signals", "-signal-file", str(files[1]))
    ).start()
    g.running_pid("a")
    g.running_pid("b")
    g.proc.send_signal(sig)  # type: ignore[union-attr]
    for f in files:
        wait_for(
            lambda f=f: f.exists() and f"signal: {sig.name}" in f.read_text(),
            what=f"{sig.name} in {f.name}",
        )
    sent = g.wait_event("signal_sent", count=2)
    assert {r["signal"] for r in sent} == {sig.name}
    assert g.stop() == 0


@pytest.mark.parametrize(
    ("policy", "code", "codes", "restarts"),
    [
        ("always", 0, "[0]", True),
        ("on-failure", 0, "[0]", False),
        ("on-failure", 3, "[0]", True),
        ("on-failure", 3, "[0, 3]", False),
        ("never", 3, "[0]", False),
    ],
)
def test_restart_policies(
    gosup_factory: Any, goapp: Path, policy: str, code: int, codes: str, restarts: bool
) -> None:
    g = gosup_factory(
        program(
            "p",
            goapp,
            "-mode",
            "exit",
            "-code",
            str(code),
            "-after",
            "300ms",
            restart=f'"{policy}"',
            success_exit_codes=codes,
        )
        + '[programs.p.backoff]\ninitial = "100ms"\njitter = 0.0\n'
    ).start()
    g.wait_event("exited", "p")
    if restarts:
        g.wait_event("started", "p", count=2)
    else:
        # The restart decision is taken in the same step as the exit record, and a
        # status request is served after that step: p has settled in EXITED.
        def settled() -> dict[str, Any] | None:
            status = g.cli("status", "--json", "p", "-c", str(g.config))
            if status.returncode != 0:
                return None  # the control socket is not up yet
            return json.loads(status.stdout)["programs"][0]  # type: ignore[no-any-return]

        assert wait_for(settled, what="p's status")["state"] == "EXITED"
        assert not g.history("p", "backoff")
        assert len(g.history("p", "started")) == 1
    assert g.stop() == 0


def test_missing_binary_backs_off_while_others_keep_running(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(
        '[programs.ghost]\ncommand = ["./bin/does-not-exist"]\n'
        '[programs.ghost.backoff]\ninitial = "50ms"\ngive_up_after = 3\n'
        '[programs.nodir]\ncommand = ["/bin/true"]\ndirectory = "no/such/dir"\n'
        '[programs.nodir.backoff]\ninitial = "50ms"\ngive_up_after = 2\n'
        '[programs.nobody]\ncommand = ["/bin/true"]\nuser = "no-such-user-xyz"\n'
        '[programs.nobody.backoff]\ninitial = "50ms"\ngive_up_after = 2\n'
        + program("healthy", goapp)
    ).start()
    pid = g.running_pid("healthy")
    err = g.wait_event("exited", "ghost")[0]["error"]
    assert "does-not-exist" in err and "not found" in err
    assert g.wait_event("fatal", "ghost")[0]["attempts"] == 3
    assert "does not exist" in g.wait_event("exited", "nodir")[0]["error"]
    assert "no-such-user-xyz" in g.wait_event("exited", "nobody")[0]["error"]
    g.wait_event("fatal", "nodir")
    g.wait_event("fatal", "nobody")
    assert pid_alive(pid)
    assert [r["pid"] for r in g.history("healthy", "started")] == [pid]
    assert "cannot start: binary './bin/does-not-exist' not found" in g.log()
    assert g.stop() == 0


def test_non_executable_binary_is_a_clear_error(gosup_factory: Any, tmp_path: Path) -> None:
    script = tmp_path / "notexec"
    script.write_text("#!/bin/sh\n")
    g = gosup_factory('[programs.x]\ncommand = ["./notexec"]\nrestart = "never"\n').start()
    assert "not executable" in g.wait_event("exited", "x")[0]["error"]
    assert g.stop() == 0


def test_second_sigint_kills_at_once(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(program("slow", goapp, "-ignore-term", stop_timeout='"60s"')).start()
    pid = g.running_pid("slow")
    g.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    g.wait_event("stopping", "slow")
    g.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    assert g.proc.wait(20) == 0  # type: ignore[union-attr]
    assert g.history("slow", "stopped")[0]["killed"] is True
    assert not pid_alive(pid)


def test_programs_stop_in_reverse_start_order(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory("".join(program(n, goapp) for n in ("one", "two", "three"))).start()
    for n in ("one", "two", "three"):
        g.running_pid(n)
    started = [r["program"] for r in g.history(event="started")]
    assert g.stop() == 0
    stopping = [r["program"] for r in g.history(event="stopping")]
    assert stopping == list(reversed(started))
    events = [r["event"] for r in g.history()]
    assert events[0] == "supervisor_started" and events[-1] == "supervisor_stopped"


def test_malformed_config_exits_2_naming_every_problem(gosup_factory: Any) -> None:
    g = gosup_factory(
        '[programs.api]\ncomand = ["x"]\nstop_signal = "SIGNOPE"\n'
        '[programs.api.backoff]\nmax = "1 parsec"\n'
    )
    result = g.cli("run", str(g.config))
    assert result.returncode == 2
    for needle in (
        "programs.api.comand",
        "programs.api.command",
        "SIGNOPE",
        "programs.api.backoff.max",
    ):
        assert needle in result.stderr
    check = g.cli("check", str(g.config))
    assert check.returncode == 2
    assert check.stderr.count("app.toml") >= 4
    assert not g.state_dir.exists()  # nothing was started or written


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run gosup as another uid")
def test_user_switch_without_root_is_a_config_error() -> None:
    """gosup running as uid 65534 cannot become root: exit 2 naming the key."""
    if sys.version_info[:2] != (3, 11) or not Path("/usr/bin/python3").exists():
        pytest.skip("no system python3 that uid 65534 may run")
    site = Path(sys.prefix) / "lib" / "python3.11" / "site-packages"
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        cfg = Path(tmp) / "app.toml"
        cfg.write_text('[programs.api]\ncommand = ["/bin/true"]\nuser = "root"\n')
        code = (
            f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site)!r}]; "
            "from supervisor.gosup import main; sys.exit(main(sys.argv[1:]))"
        )
        result = subprocess.run(
            ["/usr/bin/python3", "-c", code, "run", str(cfg)],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp,
        )
        assert result.returncode == 2, result.stderr
        assert "programs.api.user: cannot run as user 'root': gosup is not root" in result.stderr
        assert not (Path(tmp) / ".gosup").exists()  # refused before anything was written


def test_operator_restart_after_a_crash_starts_a_fresh_series(
    gosup_factory: Any, tmp_path: Path
) -> None:
    # Crashes once, then runs: the recovery run is attempt 2 of its series.
    marker = tmp_path / "crashed-once"
    script = f"if [ -e {marker} ]; then exec sleep 1000; else touch {marker}; exit 3; fi"
    g = gosup_factory(
        f'[programs.once]\ncommand = ["/bin/sh", "-c", "{script}"]\nstart_seconds = "200ms"\n'
        '[programs.once.backoff]\ninitial = "100ms"\nreset_after = "1h"\n'
    ).start()
    g.wait_event("running", "once")
    assert [s["attempt"] for s in g.history("once", "started")] == [1, 2]
    # An operator's restart is a person acting, like `stop` then `start`: attempt 1.
    assert g.cli("restart", "once").returncode == 0
    assert [s["attempt"] for s in g.history("once", "started")] == [1, 2, 1]
    assert g.cli("stop", "once").returncode == 0
    assert g.cli("start", "once").returncode == 0
    assert [s["attempt"] for s in g.history("once", "started")] == [1, 2, 1, 1]
    assert g.stop() == 0
