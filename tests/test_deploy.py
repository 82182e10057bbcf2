"""Binary deploys (issue 13, item 5; docs/deploy.md): a new Go build goes
through the same verdict as a config file, and one that breaks the service
undoes itself.

Each "build" is a real Go binary: a small launcher compiled with its
behaviour baked in by ``-ldflags -X`` (the way release builds stamp a
version), which answers ``-version`` itself (the recipe's validator) and
otherwise execs the goapp fixture with its baked-in flags: a good build, one
that crashes at start (``-fail-start``), one that never gets ready
(``-never-ready``), one that hangs after it got ready (``-hang-after``: the
liveness probe fails).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import gobuild
import pytest
from conftest import Gosup, wait_for
from test_verdicts import free_port

from supervisor import fileops

LAUNCHER = """\
package main

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

var (
	target  string // the goapp binary
	flags   string // its flags, "|"-separated
	version string
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-version" {
		fmt.Println("api " + version)
		return
	}
	argv := append([]string{target}, strings.Split(flags, "|")...)
	argv = append(argv, os.Args[1:]...)
	if err := syscall.Exec(target, argv, os.Environ()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(127)
	}
}
"""

BUILDS = {
    "v1": "-version|1",
    "v2": "-version|2",
    "crash": "-version|3|-fail-start|panic: cannot open database",
    "unready": "-version|4|-never-ready",
    "hang": "-version|5|-hang-after|300ms",
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, goapp: Path) -> Iterator[dict[str, Path]]:
    src = tmp_path_factory.mktemp("launcher")
    (src / "go.mod").write_text("module launcher\n\ngo 1.22\n")
    (src / "main.go").write_text(LAUNCHER)
    out: dict[str, Path] = {}
    for name, flags in BUILDS.items():
        binary = src / "out" / name
        binary.parent.mkdir(exist_ok=True)
        ldflags = f"-X main.target={goapp} -X 'main.flags={flags}' -X main.version={name}"
        cmd = [gobuild.go_binary(), "build", "-ldflags", ldflags, "-o", str(binary), "."]
        subprocess.run(cmd, cwd=src, env=gobuild.build_env(), check=True, capture_output=True)
        out[name] = binary
    yield out


def app_toml(port: int) -> str:
    return textwrap.dedent(f"""\
        [programs.api]
        command = ["bin/api", "-http", "127.0.0.1:{port}"]
        start_seconds = "200ms"
        stop_timeout = "5s"
        [programs.api.backoff]
        initial = "100ms"
        jitter = 0.0
        [programs.api.ready]
        http = "http://127.0.0.1:{port}/readyz"
        interval = "100ms"
        within = "2s"
        [programs.api.live]
        http = "http://127.0.0.1:{port}/healthz"
        interval = "200ms"
        timeout = "300ms"
        failures = 2
        [[programs.api.config_files]]
        path = "bin/api"
        on_change = "restart"
        validate = ["{{file}}", "-version"]
        probation = "1500ms"
        """)


def deploy(g: Gosup, build: Path) -> subprocess.CompletedProcess[str]:
    return g.cli("stage", str(build), "bin/api", timeout=90)


@pytest.fixture
def serving(
    gosup_factory: Callable[..., Gosup], builds: dict[str, Path]
) -> Iterator[tuple[Gosup, Path]]:
    """gosup running build v1 as bin/api."""
    g = gosup_factory(app_toml(free_port()))
    live = g.dir / "bin" / "api"
    live.parent.mkdir()
    live.write_bytes(builds["v1"].read_bytes())
    live.chmod(0o755)
    g.start()
    g.running_pid("api")
    yield g, live


def sha(path: Path) -> str:
    return fileops.sha256_file(path)


def runs_build(g: Gosup, build: Path, after: int) -> bool:
    """Whether a run newer than the first ``after`` runs of api is RUNNING from ``build``."""
    started = g.history("api", "started")[after:]
    running = {r["pid"] for r in g.history("api", "running")}
    return any(r["binary_sha256"] == sha(build) and r["pid"] in running for r in started)


@pytest.mark.parametrize(
    ("build", "reason"),
    [("crash", "exited"), ("unready", "not_ready"), ("hang", "unhealthy")],
)
def test_a_broken_build_rolls_itself_back(
    serving: tuple[Gosup, Path], builds: dict[str, Path], build: str, reason: str
) -> None:
    g, live = serving
    before = len(g.history("api", "started"))
    out = deploy(g, builds[build])
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"rolled back: {reason}" in out.stdout
    rec = g.wait_event("config_rolled_back", "api")[0]
    assert rec["reason"] == reason
    assert rec["sha256"] == sha(builds[build]) and rec["restored_sha256"] == sha(builds["v1"])
    wait_for(lambda: sha(live) == sha(builds["v1"]), what="v1 back in bin/api")
    assert os.stat(live).st_mode & stat.S_IXUSR
    # The previous build serves again, started by gosup itself.
    wait_for(lambda: runs_build(g, builds["v1"], before), timeout=30, what="v1 running again")
    assert not g.history("api", "fatal")


def test_a_good_build_is_confirmed(serving: tuple[Gosup, Path], builds: dict[str, Path]) -> None:
    g, live = serving
    before = len(g.history("api", "started"))
    out = deploy(g, builds["v2"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"confirmed (sha256 {sha(builds['v2'])})" in out.stdout
    assert sha(live) == sha(builds["v2"])
    assert stat.S_IMODE(os.stat(live).st_mode) == 0o755  # the staged binary keeps its mode
    assert runs_build(g, builds["v2"], before)
    assert not g.history("api", "config_rolled_back")
    started = g.history("api", "started")[before:]
    assert [r["binary_sha256"] for r in started] == [sha(builds["v2"])]
    assert json.dumps(g.history("api", "restart_requested")[-1]["reason"]) == '"config"'
