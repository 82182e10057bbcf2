"""A reload at scale (issue 18): unchanged programs are not looked up
again, and ``gosup reload`` takes the short path. Real
gosup, real Go children; the speed is measured by bench/scale.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def _program(goapp: Path, name: str, extra: str = "") -> str:
    argv = json.dumps([str(goapp), "-name", name])
    return f'\n[programs.{name}]\ncommand = {argv}\nstart_seconds = "100ms"\n{extra}\n'


def test_unchanged_programs_are_not_looked_up_again(tmp_path: Path) -> None:
    """As an unprivileged user, ``user = "root"`` is a switch gosup may not
    make: an error in a new or changed program, none in a program that a
    reload left as it was (it passed when it came)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the check as nobody")
    text = '[programs.a]\ncommand = ["/bin/true"]\nuser = "root"\n'
    code = textwrap.dedent(
        f"""
        import json
        from supervisor import config
        from supervisor.service.daemon import privilege_errors
        first = config.loads({text!r}, {str(tmp_path / "app.toml")!r})
        again = config.loads({text!r}, {str(tmp_path / "app.toml")!r})
        print(json.dumps([privilege_errors(first), privilege_errors(again, first),
                          again.programs[0] is first.programs[0]]))
        """
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    fresh, kept, same = json.loads(r.stdout)
    assert same, "an unchanged program keeps its spec object (the config's spec cache)"
    assert len(fresh) == 1 and "programs.a.user" in fresh[0] and "not root" in fresh[0]
    assert kept == []


def test_reload_of_many_programs_restarts_only_the_changed_one(
    gosup_factory: Any, goapp: Path
) -> None:
    n = 60
    text = "".join(_program(goapp, f"p{i:02d}") for i in range(n))
    g = gosup_factory(text).start()
    pids = {f"p{i:02d}": g.running_pid(f"p{i:02d}", timeout=60) for i in range(n)}
    g.config.write_text(
        g.config.read_text().replace(
            "[programs.p07]\n", '[programs.p07]\nenvironment = { CHANGED = "1" }\n'
        )
    )
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "supervisor", "reload"],
        cwd=g.dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "reloaded: added -; removed -; restarted p07; updated in place -\n"
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    # The short path: no parser for every subcommand, no config module, no history.
    assert not imported & {"supervisor.cli.commands", "supervisor.config", "supervisor.history"}
    new = int(g.wait_event("running", "p07", count=2)[-1]["pid"])
    assert new != pids["p07"]
    status = json.loads(g.cli("status", "--json").stdout)["programs"]
    assert {p["name"]: p["pid"] for p in status} == {**pids, "p07": new}
    # A file tomllib refuses: nothing changes, and the error is in its words.
    g.config.write_text(g.config.read_text() + "\n[programs.p01]\n")
    r = g.cli("reload")
    assert r.returncode == 2, r.stderr
    assert "app.toml: line" in r.stderr and "Cannot declare ('programs', 'p01') twice" in r.stderr
    assert g.cli("reload", "--bogus").returncode == 2  # argparse's usage error, as before
    wait_for(lambda: g.history(event="supervisor_reloaded"), 10, "the reload's record")
    assert len(g.history(event="supervisor_reloaded")) == 1
    assert g.stop() == 0
