"""Readiness that the old process cannot answer (issue 14): during an overlap
restart both processes accept on the same socket, so a probe on that port
may be answered by the old one. ``[ready] notify = true`` (sd_notify: READY=1
from the replacement's own pid) and ``{pid}`` in a probe target make gosup
wait for the replacement itself.

The replacement is slow to get ready (goapp -ready-delay) while the old
process answers /readyz 200 on the shared port all along: the replacement's
``running`` must come no earlier than its ready delay after its ``started``,
and the old process is stopped only after that.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Gosup, gosup_check, pid_alive, wait_for
from test_sockets import ClientLoop, free_port

GosupFactory = Callable[..., Gosup]
READY_DELAY = 2.0  # the replacement answers 503 (and says nothing) this long after its start
# A plain probe on the shared port took the replacement as RUNNING 0.0-0.3 s
# after its start (the old process answered); the bound leaves a loaded machine room.
EARLIEST = READY_DELAY - 0.5

READY = {
    "notify": """
        [programs.api.ready]
        notify = true
        within = "20s"
    """,
    "pid-http": """
        [programs.api.ready]
        http = "http://127.0.0.1:{port}/readyz?pid={{pid}}"
        interval = "50ms"
        within = "20s"
    """,
    # an exec probe that asks /readyz?pid=N itself
    "pid-exec": """
        [programs.api.ready]
        exec = ["{python}", "-c", "{exec_probe}", "{{pid}}"]
        interval = "50ms"
        timeout = "3s"
        within = "20s"
    """,
    # the unsafe one, kept to show what the others fix (see test below)
    "plain": """
        [programs.api.ready]
        http = "http://127.0.0.1:{port}/readyz"
        interval = "50ms"
        within = "20s"
    """,
}


EXEC_PROBE = (
    "import sys, urllib.request; "
    "urllib.request.urlopen('http://127.0.0.1:%s/readyz?pid=' + sys.argv[1], timeout=1)"
)


def ts(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()


def api_toml(goapp: Path, port: int, ready: str, flags: str = '"-notify"') -> str:
    ready = ready.format(port=port, python=sys.executable, exec_probe=EXEC_PROBE % port)
    return f"""
        [programs.api]
        command = ["{goapp}", "-name", "api", "-ready-delay", "{READY_DELAY}s", {flags}]
        sockets = ["tcp://127.0.0.1:{port}"]
        restart_mode = "overlap"
        stop_timeout = "10s"
        {ready}
    """


def overlap_restart(g: Gosup) -> tuple[int, int, float]:
    """(old pid, new pid, seconds from the replacement's start to its running)."""
    old = g.running_pid("api", timeout=30)
    result = g.cli("restart", "api", "-c", str(g.config), timeout=60)
    assert result.returncode == 0, result
    running = g.wait_event("running", "api", count=2, timeout=30)[-1]
    new = int(running["pid"])
    started = g.history("api", "started")[-1]
    assert int(started["pid"]) == new
    return old, new, ts(running) - ts(started)


@pytest.mark.parametrize("kind", ["notify", "pid-http", "pid-exec"])
def test_overlap_waits_for_the_replacement_itself(
    kind: str, goapp: Path, gosup_factory: GosupFactory
) -> None:
    port = free_port()
    g = gosup_factory(api_toml(goapp, port, READY[kind], '"-notify"'))
    g.start()
    g.running_pid("api", timeout=30)
    with ClientLoop(port) as client:
        client.wait_answers(3)
        old, new, took = overlap_restart(g)
        client.wait_answers(3)
    assert took >= EARLIEST, (
        f"{kind}: RUNNING {took:.2f}s after the start, ready after {READY_DELAY}s"
    )
    events = [(r["event"], r.get("pid")) for r in g.history("api")]
    assert events.index(("running", new)) < events.index(("stopping", old))
    assert not pid_alive(old)
    assert set(client.outcomes) == {"ok"}, (client.outcomes, client.errors[:5])
    if kind == "notify":  # and it was gosup's socket the program was given
        out = (g.log_dir / "api.stdout.log").read_text()
        assert f"notify: socket={g.state_dir / 'notify'}" in out
        assert "notify: sent READY=1" in out
    assert g.stop() == 0


def test_a_plain_probe_on_the_shared_port_is_answered_by_the_old_process(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    """Why the two above exist (and why `gosup check` warns about this config)."""
    port = free_port()
    g = gosup_factory(api_toml(goapp, port, READY["plain"], '"-notify"'))
    g.start()
    _, _, took = overlap_restart(g)
    print(f"plain probe: the replacement RUNNING {took:.3f}s after its start")
    assert took < READY_DELAY, f"RUNNING {took:.2f}s after the start: the old one answered"
    check = g.cli("check", str(g.config))
    assert check.returncode == 0, check
    assert "programs.api.ready.http" in check.stderr and "{pid}" in check.stderr, check.stderr
    assert g.stop() == 0


def send_as_us(path: Path, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(data, str(path))


def test_datagrams_that_do_not_come_from_the_run_itself_are_ignored(
    goapp: Path, gosup_factory: GosupFactory
) -> None:
    """goapp -notify-junk sends a garbage datagram and an oversized one that
    holds READY=1; the test (not a child of gosup) sends a proper READY=1.
    None of them makes the program ready: it fails its start (not_ready)."""
    port = free_port()
    ready = '[programs.api.ready]\n        notify = true\n        within = "3s"'
    toml = api_toml(goapp, port, ready, '"-notify-junk"')
    toml += '\n        [programs.api.backoff]\n        initial = "30s"\n'
    g = gosup_factory(toml)
    # gosup under systemd has a NOTIFY_SOCKET of its own: the child must get gosup's
    fake_systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fake_systemd.bind(str(g.dir / "systemd-notify"))
    try:
        g.start(extra_env={"NOTIFY_SOCKET": str(g.dir / "systemd-notify")})
        started = g.wait_event("started", "api")[-1]
        out = g.log_dir / "api.stdout.log"
        wait_for(lambda: out.exists() and "notify: sent oversized" in out.read_text(), 15)
        send_as_us(g.state_dir / "notify", b"READY=1\n")
        failed = g.wait_event("probe_failed", "api", timeout=20)[-1]
        exited = g.wait_event("exited", "api", timeout=20)[-1]
    finally:
        fake_systemd.close()
    assert failed["probe"] == "ready" and failed["target"] == "sd_notify READY=1"
    assert f"no READY=1 from pid {started['pid']} within 3s" in failed["error"]
    assert exited["reason"] == "not_ready"
    assert not g.history("api", "running")
    assert f"notify: socket={g.state_dir / 'notify'}" in out.read_text()
    log = g.log()
    for why in ("not KEY=VALUE lines", "larger than 4096 bytes", "not the main process"):
        assert f"({why}" in log, (why, log[-2000:])
    assert g.stop() == 0


@pytest.mark.parametrize(
    ("ready", "warned"),
    [
        ('http = "http://127.0.0.1:{port}/readyz"', True),
        ('http = "http://localhost:{port}/readyz"', True),  # the same host, spelled otherwise
        ('tcp = "127.0.0.1:{port}"', True),
        ('http = "http://127.0.0.1:{port}/readyz?pid={{pid}}"', False),
        ("notify = true", False),
        ('http = "http://127.0.0.1:{other}/readyz"', False),  # not on its own socket
    ],
)
def test_check_warns_about_a_ready_probe_the_old_process_can_answer(
    tmp_path: Path, ready: str, warned: bool
) -> None:
    port, other = 18080, 18081  # never bound: `gosup check` only reads the config
    config = tmp_path / "app.toml"
    config.write_text(
        "[programs.api]\n"
        'command = ["/bin/true"]\n'
        f'sockets = ["tcp://127.0.0.1:{port}"]\n'
        'restart_mode = "overlap"\n'
        "[programs.api.ready]\n" + ready.format(port=port, other=other) + "\n"
    )
    result = gosup_check(config)
    assert result.returncode == 0, result.stderr
    assert ("is on the program's own socket" in result.stderr) is warned, result.stderr
