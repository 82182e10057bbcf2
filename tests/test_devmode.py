"""Development mode (`gosup run --dev`): build before the first start, rebuild
and restart on a source change, keep the last good build running through a
broken one, apply app.toml on save.

The integration tests copy tests/fixtures/devapp (a tiny Go service that
prints its version constant and pid when it starts) into the test's temp
directory and let a real `gosup run --dev` build it with the project's Go
toolchain.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import gobuild
import pytest
from conftest import FIXTURES, Gosup, pid_alive, wait_for
from test_orphans import child_of_test, kill_gosup_and_wait_gone

from supervisor.config import BuildSpec
from supervisor.service.builder import Globs, SourceFilter

BUILD_TIMEOUT = 90.0  # a cold Go build cache on a loaded 2-core machine
# The build runs with the program's environment over gosup's: offline, local toolchain.
GO_ENV = (
    '{ GOTOOLCHAIN = "local", GOPROXY = "off", GOFLAGS = "-buildvcs=false", '
    'GOWORK = "off", CGO_ENABLED = "0" }'
)


# -- what counts as a source (no processes) -------------------------------------------


@pytest.mark.parametrize(
    ("rel", "wanted"),
    [
        ("main.go", True),
        ("cmd/api/main.go", True),
        ("go.mod", True),
        ("internal/x/go.sum", True),
        ("README.md", False),
        ("vendor/github.com/x/y.go", False),
        (".git/HEAD", False),
        ("sub/.git/x.go", False),
        ("main.go.swp", False),
        (".main.go.swp", False),
        ("main.go~", False),
        ("4913", False),
        (".#main.go", False),
        ("testdata/gen.go", False),  # BuildSpec.ignore
        ("web/static/app.go", False),  # BuildSpec.ignore, anchored
        ("static/app.go", True),  # anchored glob: only web/static is ignored
    ],
)
def test_source_filter(tmp_path: Path, rel: str, wanted: bool) -> None:
    spec = BuildSpec(
        command=("go", "build"),
        directory=tmp_path,
        ignore=("testdata", "web/static/**"),
    )
    accept = SourceFilter(spec, never=(), binary=None)
    assert accept(str(tmp_path / rel)) is wanted


def test_source_filter_skips_gosups_own_files_and_the_binary(tmp_path: Path) -> None:
    spec = BuildSpec(command=("go", "build"), directory=tmp_path, watch=("**",))
    accept = SourceFilter(
        spec, never=(tmp_path / "logs", tmp_path / "app.toml"), binary=tmp_path / "bin" / "api"
    )
    assert accept(str(tmp_path / "main.go"))
    assert not accept(str(tmp_path / "logs" / "api.stdout.log"))
    assert not accept(str(tmp_path / "app.toml"))
    assert not accept(str(tmp_path / "bin" / "api"))
    assert not accept(str(tmp_path / "bin" / "api-go-tmp-umask"))  # go build's probe
    assert not accept("/elsewhere/main.go")


def test_globs() -> None:
    assert Globs(["**/*.go"]).match("a/b/c.go")
    assert Globs(["**/*.go"]).match("c.go")
    assert not Globs(["*.go"]).match("a/b/c.gox")
    assert Globs(["cmd/**"]).match("cmd/api/main.go")
    assert not Globs(["cmd/*.go"]).match("cmd/api/main.go")
    assert Globs(["file[0-9].go"]).match("x/file7.go")
    assert not Globs(["file[!0-9].go"]).match("file7.go")
    assert Globs(["templates"]).match("templates/index.html")
    # .gitignore rules beyond the common ones (docs/development.md)
    assert Globs(["/vendor"]).match("vendor/a.go")
    assert not Globs(["/vendor"]).match("x/vendor/a.go")
    assert Globs(["gen/"]).match("x/gen/a.go")
    assert not Globs(["gen/"]).match("gen")  # a file named like the directory
    assert not Globs(["**/*.go", "!gen/**"]).match("gen/a.go")
    assert Globs(["./cmd/*.go"]).match("cmd/a.go")
    assert Globs(["#notes"]).match("#notes")  # a name, not a comment
    assert not Globs(["", "  "]).match("a.go")


# -- a real gosup --dev ------------------------------------------------------------------


def app_toml(debounce: str = "100ms", build_command: str | None = None, extra: str = "") -> str:
    go = gobuild.go_binary()
    command = build_command or f'["{go}", "build", "-o", "bin/devapp", "."]'
    return textwrap.dedent(
        f"""\
        [programs.devapp]
        command = ["./bin/devapp"]
        start_seconds = "200ms"
        stop_timeout = "5s"
        environment = {GO_ENV}

        [programs.devapp.build]
        command = {command}
        debounce = "{debounce}"
        """
    ) + textwrap.dedent(extra)


def project(g: Gosup) -> Gosup:
    """Put the devapp source next to the test's app.toml."""
    for name in ("go.mod", "main.go"):
        shutil.copy(FIXTURES / "devapp" / name, g.dir / name)
    return g


def set_version(g: Gosup, version: str, *, broken: bool = False, rename: bool = False) -> None:
    """Rewrite the version constant (broken: an undefined name, not a string),
    in place or, like GoLand's safe write, into a temp file renamed over main.go."""
    main = g.dir / "main.go"
    value = version if broken else f'"{version}"'
    text = re.sub(r"(?m)^const version = .*$", f"const version = {value}", main.read_text())
    if rename:
        tmp = g.dir / "main.go___jb_tmp___"
        tmp.write_text(text)
        os.replace(tmp, main)
    else:
        main.write_text(text)


def wait_version(g: Gosup, pid: int, version: str) -> None:
    log = g.log_dir / "devapp.stdout.log"
    needle = f"devapp version={version} pid={pid} "
    wait_for(
        lambda: log.exists() and needle in log.read_text(), 15, f"pid {pid} printing {version}"
    )


def events(g: Gosup, program: str = "devapp") -> list[str]:
    return [r["event"] for r in g.history(program)]


def builds(g: Gosup, event: str) -> list[dict[str, Any]]:
    return g.history("devapp", event)


def test_build_before_first_start_then_rebuild_and_restart_on_change(gosup_factory: Any) -> None:
    g = project(gosup_factory(app_toml(), "--dev")).start()
    pid1 = g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    wait_version(g, pid1, "v1")
    first = events(g)
    assert first.index("build_succeeded") < first.index("started")  # built before its start
    done = builds(g, "build_succeeded")[0]
    assert done["command"][1:] == ["build", "-o", "bin/devapp", "."]
    assert done["duration_s"] > 0

    set_version(g, "v2")
    runs = g.wait_event("running", "devapp", count=2, timeout=BUILD_TIMEOUT)
    pid2 = int(runs[-1]["pid"])
    assert pid2 != pid1
    wait_version(g, pid2, "v2")
    assert [r["reason"] for r in builds(g, "restart_requested")] == ["build"]
    assert not pid_alive(pid1)
    assert len(builds(g, "build_succeeded")) == 2
    assert g.stop() == 0


def test_broken_build_keeps_the_last_good_one_running(gosup_factory: Any) -> None:
    g = project(gosup_factory(app_toml(), "--dev")).start()
    pid1 = g.running_pid("devapp", timeout=BUILD_TIMEOUT)

    set_version(g, "v2", broken=True)
    failed = g.wait_event("build_failed", "devapp", timeout=BUILD_TIMEOUT)[0]
    assert failed["exit_code"] not in (0, None)
    assert "undefined: v2" in failed["output_tail"]
    assert failed["duration_s"] > 0 and failed["command"][0] == gobuild.go_binary()
    wait_for(lambda: "BUILD FAILED" in g.log(), 10, "the failure in gosup's log")
    log = g.log()
    assert "undefined: v2" in log and f"pid {pid1} keeps running the last good build" in log
    assert "devapp build | " in log  # the build's own output, line by line
    assert pid_alive(pid1)
    assert builds(g, "restart_requested") == [] and builds(g, "stopping") == []

    set_version(g, "v3", rename=True)  # fixed: the next good build replaces it
    runs = g.wait_event("running", "devapp", count=2, timeout=BUILD_TIMEOUT)
    wait_version(g, int(runs[-1]["pid"]), "v3")
    assert g.stop() == 0


def test_a_burst_of_saves_builds_once_the_last_version(gosup_factory: Any) -> None:
    # A generous debounce: the burst must land in one quiet window even on a loaded machine.
    g = project(gosup_factory(app_toml(debounce="600ms"), "--dev")).start()
    pid1 = g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    for version in ("v2", "v3", "v4", "v5"):
        set_version(g, version)
    runs = g.wait_event("running", "devapp", count=2, timeout=BUILD_TIMEOUT)
    pid2 = int(runs[-1]["pid"])
    assert pid2 != pid1
    wait_version(g, pid2, "v5")
    assert len(builds(g, "build_started")) == 2  # the first build, and one for the burst
    assert len(builds(g, "restart_requested")) == 1
    assert g.stop() == 0


def test_a_change_during_a_build_kills_it_and_builds_the_newest(gosup_factory: Any) -> None:
    go = gobuild.go_binary()
    slow = f'["sh", "-c", "sleep 1.5; exec {go} build -o bin/devapp ."]'
    g = project(gosup_factory(app_toml(build_command=slow), "--dev")).start()
    g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    set_version(g, "v2")
    g.wait_event("build_started", "devapp", count=2, timeout=BUILD_TIMEOUT)
    set_version(g, "v3")  # lands during the 1.5 s build of v2
    superseded = g.wait_event("build_failed", "devapp", timeout=BUILD_TIMEOUT)[0]
    assert superseded["reason"] == "superseded"
    runs = g.wait_event("running", "devapp", count=2, timeout=BUILD_TIMEOUT)
    wait_version(g, int(runs[-1]["pid"]), "v3")
    assert len(builds(g, "restart_requested")) == 1  # v2 never ran
    assert g.stop() == 0


def test_a_failed_first_build_starts_nothing_until_fixed(gosup_factory: Any) -> None:
    g = project(gosup_factory(app_toml(), "--dev", "--echo"))
    set_version(g, "v1", broken=True)
    g.start()
    g.wait_event("build_failed", "devapp", timeout=BUILD_TIMEOUT)
    wait_for(lambda: "nothing started yet" in g.log(), 10, "the failure in gosup's log")
    # --echo: the compiler's errors are on the terminal, under the program's prefix
    wait_for(lambda: "devapp | ./main.go" in g.out.read_text(), 10, "prefixed build output")
    assert "started" not in events(g)

    set_version(g, "v2")
    pid = g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    wait_version(g, pid, "v2")
    assert builds(g, "restart_requested") == []  # a first start, not a restart
    assert g.stop() == 0


def test_build_section_is_ignored_without_dev(gosup_factory: Any) -> None:
    g = project(gosup_factory(app_toml()))
    gobuild.build(g.dir, g.dir / "bin" / "devapp")
    g.start()
    pid = g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    wait_version(g, pid, "v1")
    assert not [e for e in events(g) if e.startswith("build_")]
    assert "used only by `gosup run --dev`" in g.log()
    assert g.stop() == 0


def test_shutdown_during_a_build_kills_its_process_group(gosup_factory: Any) -> None:
    # A build that never ends, with a child of its own in its process group;
    # the autouse leak check fails the test if either survives gosup.
    slow = '["sh", "-c", "sleep 300 & sleep 300"]'
    g = project(gosup_factory(app_toml(build_command=slow), "--dev")).start()
    g.wait_event("build_started", "devapp", timeout=BUILD_TIMEOUT)
    began = time.monotonic()
    assert g.stop() == 0
    assert time.monotonic() - began < 15
    failed = builds(g, "build_failed")
    assert [r["reason"] for r in failed] == ["stopped"]
    assert "started" not in events(g)


def test_a_build_dies_with_a_sigkilled_gosup(
    gosup_factory: Any, no_leftover_processes: str
) -> None:
    g = project(gosup_factory(app_toml(build_command='["sleep", "2718"]'), "--dev")).start()
    g.wait_event("build_started", "devapp", timeout=BUILD_TIMEOUT)
    found = wait_for(lambda: child_of_test(no_leftover_processes, "2718"), 15, "the build running")
    kill_gosup_and_wait_gone(g, found, "devapp")


# -- app.toml on save ----------------------------------------------------------------------

SECOND = f"""
[programs.second]
command = ["{sys.executable}", "-c", "import time; time.sleep(300)"]
start_seconds = "200ms"
"""


def test_saving_app_toml_applies_the_difference(gosup_factory: Any) -> None:
    g = project(gosup_factory(app_toml(), "--dev")).start()
    pid = g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    g.config.write_text(app_toml(extra=SECOND))
    reloaded = g.wait_event("supervisor_reloaded", timeout=30)[0]
    assert reloaded["added"] == ["second"] and reloaded["changed"] == []
    g.running_pid("second", timeout=30)
    assert g.running_pid("devapp") == pid and pid_alive(pid)  # untouched: not even rebuilt
    assert len(builds(g, "build_started")) == 1
    assert g.stop() == 0


def test_a_broken_app_toml_save_changes_nothing(gosup_factory: Any) -> None:
    g = project(gosup_factory(app_toml(), "--dev")).start()
    pid = g.running_pid("devapp", timeout=BUILD_TIMEOUT)
    broken = app_toml(extra=SECOND).replace(
        'stop_timeout = "5s"', 'stop_timeout = "5s"\nrestart = "sometimes"\nbogus = 1'
    )
    g.config.write_text(broken)
    wait_for(lambda: "not applied" in g.log(), 30, "the refusal in gosup's log")
    log = g.log()
    assert "programs.devapp.restart" in log and "programs.devapp.bogus" in log  # every error
    assert g.history(event="supervisor_reloaded") == []
    assert pid_alive(pid) and g.history("second") == []
    assert g.stop() == 0
