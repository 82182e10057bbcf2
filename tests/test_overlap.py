"""restart_mode = "overlap" (issue 14): a planned restart starts the
replacement on the same sockets first and stops the old process only once the
replacement is RUNNING; a replacement that crashes or never gets ready is
stopped and the old process keeps serving (``restart_failed``).

A client loop counts every failed request through the restarts (outcomes are
counted, nothing is timed).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from conftest import Gosup, pid_alive, wait_for
from test_deploy import builds  # noqa: F401 (a fixture: Go builds of a launcher)
from test_sockets import ClientLoop, free_port, get, served_by

from supervisor import fileops

GosupFactory = Callable[..., Gosup]


def overlap_toml(goapp: Path, port: int, ready: str = "") -> str:
    # sh picks the flags by marker files and execs goapp (same pid, so
    # LISTEN_PID still names it): "crash" = the next start fails, "slow" = it
    # is never ready (the exec probe below fails while "slow" exists).
    script = (
        'if [ -e crash ]; then exec "$0" -fail-start boom; fi; '
        'exec "$0" -name api -ready-delay 300ms -shutdown-timeout 5s'
    )
    return f"""
        [programs.api]
        command = ["sh", "-c", '{script}', "{goapp}"]
        sockets = ["tcp://127.0.0.1:{port}"]
        restart_mode = "overlap"
        start_seconds = "300ms"
        stop_timeout = "10s"
        {ready}
    """


def status(g: Gosup) -> dict[str, object]:
    out = g.cli("status", "--json", "-c", str(g.config))
    programs: list[dict[str, object]] = json.loads(out.stdout)["programs"]
    return programs[0]


def test_operator_restarts_overlap_and_fail_no_request(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    port = free_port()
    g = gosup_factory(overlap_toml(goapp, port))
    g.start()
    pids = [g.running_pid("api")]
    with ClientLoop(port) as client:
        client.wait_answers(5)
        for n in range(3):
            result = g.cli("restart", "api", "-c", str(g.config))
            assert result.returncode == 0, result
            recs = g.wait_event("running", "api", count=n + 2)
            pids.append(int(recs[-1]["pid"]))
            assert not pid_alive(pids[-2]), "the old process is gone when the restart returns"
            client.wait_answers(5)
    # Nobody is refused and nothing is cut off: goapp stops accepting and lets
    # the connections it accepted reach a handler before Shutdown (Shutdown
    # alone dropped about 1 request in 6,000 here: docs/zero-downtime.md).
    assert set(client.outcomes) == {"ok"}, (client.outcomes, client.errors[:5])
    assert client.pids >= set(pids[1:])
    # The history: the replacement started (and ran) before the old one was stopped.
    events = [(r["event"], r.get("pid")) for r in g.history("api")]
    for old, new in itertools.pairwise(pids):
        assert events.index(("started", new)) < events.index(("stopping", old))
        assert events.index(("running", new)) < events.index(("stopping", old))
        assert events.index(("stopped", old)) > events.index(("running", new))
    assert g.stop() == 0


def test_a_replacement_that_never_gets_ready_leaves_the_old_one_serving(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    port = free_port()
    ready = '[programs.api.ready]\n        exec = ["sh", "-c", "test ! -e slow"]\n'
    ready += '        interval = "100ms"\n        within = "2s"'
    g = gosup_factory(overlap_toml(goapp, port, ready))
    g.start()
    old = g.running_pid("api")
    (g.dir / "slow").touch()
    with ClientLoop(port) as client:
        client.wait_answers(3)
        result_holder: list[subprocess.CompletedProcess[str]] = []
        t = threading.Thread(
            target=lambda: result_holder.append(g.cli("restart", "api", "-c", str(g.config)))
        )
        t.start()
        started = g.wait_event("started", "api", count=2)
        replacement = int(started[-1]["pid"])
        seen = wait_for(lambda: status(g).get("replacement_pid") == replacement and status(g))
        assert seen["pid"] == old and seen["state"] == "STARTING"
        t.join(60)
        client.wait_answers(3)
    result = result_holder[0]
    assert result.returncode == 1, result
    assert "restart failed (not_ready)" in result.stderr
    failed = g.wait_event("restart_failed", "api")[-1]
    assert failed["reason"] == "not_ready" and failed["pid"] == replacement
    g.wait_event("stopped", "api", where=lambda r: r["pid"] == replacement)
    assert not pid_alive(replacement)
    assert pid_alive(old)
    assert set(client.outcomes) == {"ok"}, client.outcomes
    # (the replacement accepts on the shared socket as soon as it listens, ready
    # or not: docs/zero-downtime.md says to Serve only once initialised)
    assert old in client.pids
    st = status(g)
    assert st["state"] == "RUNNING" and st["pid"] == old and st["replacement_pid"] is None
    assert g.stop() == 0


def test_a_replacement_that_crashes_leaves_the_old_one_serving(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    port = free_port()
    g = gosup_factory(overlap_toml(goapp, port))
    g.start()
    old = g.running_pid("api")
    (g.dir / "crash").touch()
    with ClientLoop(port) as client:
        client.wait_answers(3)
        result = g.cli("restart", "api", "-c", str(g.config))
        client.wait_answers(3)
    assert result.returncode == 1, result
    assert "restart failed (exited)" in result.stderr
    failed = g.wait_event("restart_failed", "api")[-1]
    assert "boom" in failed["error"], failed
    assert set(client.outcomes) == {"ok"}, client.outcomes
    assert served_by(get(port)[1]) == old
    # and once fixed, the next restart goes through
    os.unlink(g.dir / "crash")
    assert g.cli("restart", "api", "-c", str(g.config)).returncode == 0
    assert not pid_alive(old)
    assert g.stop() == 0


def test_a_deploy_whose_replacement_never_gets_ready_is_rolled_back(
    goapp: Path,
    gosup_factory: GosupFactory,
    builds: dict[str, Path],  # noqa: F811 (the fixture imported above)
) -> None:
    """A binary deploy (on_change = "restart") under overlap: the new build's
    replacement never gets ready, so the old process never stops serving, and
    the deploy's verdict is the rollback (DESIGN §3, §4)."""
    port = free_port()
    g = gosup_factory(f"""
        [programs.api]
        command = ["bin/api"]
        sockets = ["tcp://127.0.0.1:{port}"]
        restart_mode = "overlap"
        stop_timeout = "5s"
        [programs.api.ready]
        http = "http://127.0.0.1:{port}/readyz?pid={{pid}}"
        interval = "100ms"
        within = "2s"
        [[programs.api.config_files]]
        path = "bin/api"
        on_change = "restart"
        validate = ["{{file}}", "-version"]
        probation = "1s"
    """)
    live = g.dir / "bin" / "api"
    live.parent.mkdir()
    live.write_bytes(builds["v1"].read_bytes())
    live.chmod(0o755)
    g.start()
    old = g.running_pid("api")
    with ClientLoop(port) as client:
        client.wait_answers(3)
        out = g.cli("stage", str(builds["unready"]), "bin/api", timeout=90)
        client.wait_answers(3)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rolled back: not_ready" in out.stdout, out.stdout + out.stderr
    failed = g.wait_event("restart_failed", "api")[-1]
    assert failed["reason"] == "not_ready" and failed["restart"] == "config"
    rolled = g.wait_event("config_rolled_back", "api")[-1]
    assert rolled["reason"] == "not_ready"
    assert rolled["restored_sha256"] == fileops.sha256_file(builds["v1"])
    assert fileops.sha256_file(live) == fileops.sha256_file(builds["v1"])
    # the old process served throughout and still does; nothing was refused or cut
    assert pid_alive(old)
    assert set(client.outcomes) == {"ok"}, (client.outcomes, client.errors[:5])
    assert client.pids == {old} or old in client.pids
    # the old process runs the restored build already: nothing is restarted again
    assert status(g)["state"] == "RUNNING" and status(g)["pid"] == old
    assert len(g.history("api", "restart_requested")) == 1
    assert not g.history("api", "fatal")
    assert g.stop() == 0
