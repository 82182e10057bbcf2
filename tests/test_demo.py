"""The demo (issue 14, Deliver 4): examples/demo under config.toml.example as it
is (only the port and paths moved into the test's directory) serves on the
socket gosup holds, and keeps answering through overlap restarts (nothing
refused, nothing cut off) and through crashes (nothing refused).

A client loop counts every request's outcome; nothing is timed.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import gobuild
import pytest
from conftest import ROOT, Gosup, pid_alive, wait_for
from test_sockets import ClientLoop, free_port, get, listening_inodes, served_by, socket_fds

GosupFactory = Callable[..., Gosup]


@pytest.fixture(scope="session")
def demo_bin(go_bin_dir: Path) -> Path:
    return gobuild.build(ROOT / "examples" / "demo", go_bin_dir / "demo")


def example_config(directory: Path, demo_bin: Path, port: int) -> str:
    """config.toml.example, on ``port``, with the demo binary and its config file."""
    conf = directory / "examples" / "demo" / "demo.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "demo" / "demo.conf", conf)
    text = (ROOT / "config.toml.example").read_text()
    assert '"./bin/demo"' in text and "127.0.0.1:8080" in text
    text = text.replace('"./bin/demo"', f'"{demo_bin}"')
    return text.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def restart(g: Gosup, *args: str) -> int:
    """Run a gosup command on the demo; the pid that is RUNNING afterwards."""
    before = len(g.history("demo", "running"))
    result = g.cli(*args, "-c", str(g.config))
    assert result.returncode == 0, result
    return int(g.wait_event("running", "demo", count=before + 1, timeout=30)[-1]["pid"])


def test_the_demo_serves_on_the_inherited_socket_through_restarts_and_crashes(
    demo_bin: Path, gosup_factory: GosupFactory, tmp_path: Path
) -> None:
    port = free_port()
    g = gosup_factory(example_config(tmp_path, demo_bin, port))
    g.start()
    first = g.running_pid("demo", timeout=30)
    # ready by its own READY=1 (sd_notify): no probe the old process could answer
    check = g.cli("check", str(g.config))
    assert check.returncode == 0 and "ready." not in check.stderr, check
    assert "notify = true" in g.config.read_text()
    # the one socket listening on the port is gosup's, and the demo holds it
    # (net.FileListener took a copy of fd 3); the demo did not bind its own
    (listening,) = listening_inodes(port)
    assert listening in socket_fds(first).values()
    assert listening in socket_fds(g.pid).values()
    log = tmp_path / "logs" / "demo.stderr.log"
    wait_for(lambda: "serving on the inherited socket" in log.read_text(), 10, "demo's log")
    status, body = get(port)
    assert status == 200 and served_by(body) == first
    assert get(port, "/readyz")[0] == 200

    # planned restarts overlap: nobody refused, nothing cut off
    pids = [first]
    with ClientLoop(port) as client:
        client.wait_answers(5)
        for _ in range(3):
            pids.append(restart(g, "restart", "demo"))
            assert not pid_alive(pids[-2])
            client.wait_answers(5)
    assert set(client.outcomes) == {"ok"}, (client.outcomes, client.errors[:5])
    assert client.pids >= set(pids[1:])

    # crashes: the socket stays open, new connections wait in the backlog. A
    # request the killed process had already accepted dies with it (a reset or
    # a close without answer); none is refused.
    with ClientLoop(port) as client:
        client.wait_answers(5)
        for _ in range(2):
            pids.append(restart(g, "signal", "SIGKILL", "demo"))
            client.wait_answers(5)
    assert "refused" not in client.outcomes, client.outcomes
    assert sum(n for k, n in client.outcomes.items() if k != "ok") <= 2, client.outcomes
    assert listening_inodes(port) == {listening}
    assert listening in socket_fds(pids[-1]).values()
    assert g.stop() == 0


def test_the_demo_binds_its_own_port_without_gosup(demo_bin: Path, tmp_path: Path) -> None:
    port = free_port()
    conf = tmp_path / "demo.conf"
    shutil.copy(ROOT / "examples" / "demo" / "demo.conf", conf)
    proc = subprocess.Popen(
        [str(demo_bin), "-listen", f"127.0.0.1:{port}", "-config", str(conf)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: listening_inodes(port), 10, "the demo listening")
        status, body = get(port)
        assert status == 200 and f"pid {proc.pid}" in body
        assert get(port, "/readyz")[0] == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "bound ourselves: no inherited socket" in err
