"""`gosup reload` restarts a program only when how it runs changed (issue 17.2).

DESIGN §4: command, environment, directory, user, group, sockets and
capabilities (and go_env, which changes the environment) restart it; new
limits, probes, logs, backoff and config_files settings are applied to the
running process, which keeps its pid. Real gosup, real Go program.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Gosup, wait_for

from supervisor.config import loads
from supervisor.service.daemon import runs_differently


def app(goapp: Path, *args: str, body: str = "") -> str:
    argv = json.dumps([str(goapp), "-mode", "serve", *args])
    return f"""
[programs.api]
command = {argv}
start_seconds = "200ms"
stop_timeout = "5s"
{body}
"""


def reload(g: Gosup) -> str:
    result = g.cli("reload")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def api_pid(g: Gosup) -> int:
    result = g.cli("status", "--json", "api")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["programs"][0]["pid"])


def test_a_new_limit_applies_to_the_running_process(gosup_factory: Any, goapp: Path) -> None:
    """Lowering a limit during an incident must not restart the program
    (before: any edit to its section did); the new limit is enforced on the
    process that runs: here it is below the program's baseline, so the
    sampler finds it over the limit and asks for a leak restart."""
    limits = '[programs.api.limits]\ninterval = "200ms"\nsustain = 1\nthreads = {}\n'
    g = gosup_factory(app(goapp, body=limits.format(10_000))).start()
    pid = g.running_pid("api")
    g.config.write_text(app(goapp, body=limits.format(1)))
    assert reload(g) == "reloaded: added -; removed -; restarted -; updated in place api"
    rec = g.history(event="supervisor_reloaded")[-1]
    assert (rec["changed"], rec["updated"]) == ([], ["api"])
    found = g.wait_event("limit_exceeded", "api", timeout=20)[0]
    assert (found["metric"], found["limit"], found["pid"]) == ("threads", 1, pid)
    assert g.wait_event("restart_requested", "api")[0]["reason"] == "leak"
    # The reload itself stopped nothing: the first stop of that process is the
    # leak restart the new limit asked for (it may come within one interval).
    first_stop = g.wait_event("stopping", "api")[0]
    assert (first_stop["pid"], first_stop["reason"]) == (pid, "restart (leak)")
    assert g.stop() == 0


def test_a_changed_command_restarts_the_program(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(app(goapp)).start()
    pid = g.running_pid("api")
    g.config.write_text(app(goapp, "-version", "2"))
    assert reload(g) == "reloaded: added -; removed -; restarted api; updated in place -"
    wait_for(lambda: len(g.history("api", "running")) == 2, 15, "the restarted api running")
    assert api_pid(g) != pid
    stopped = g.history("api", "stopped")[-1]
    assert (stopped["pid"], stopped["reason"]) == (pid, "changed by reload")
    assert g.stop() == 0


def test_new_config_files_are_watched_without_a_restart(gosup_factory: Any, goapp: Path) -> None:
    """config_files added by a reload: the program's ConfigSync is made
    again from the new spec; a staged version is applied, the program
    reloads it (SIGHUP) and confirms it, same pid."""
    g = gosup_factory(app(goapp, "-config", "conf/api.yaml"))
    (g.dir / "conf").mkdir()
    (g.dir / "conf" / "api.yaml").write_text("v1\n")
    g.start()
    pid = g.running_pid("api")
    files = '[[programs.api.config_files]]\npath = "conf/api.yaml"\non_change = "reload"\n'
    files += 'probation = "500ms"\n'
    g.config.write_text(app(goapp, "-config", "conf/api.yaml", body=files))
    assert reload(g) == "reloaded: added -; removed -; restarted -; updated in place api"
    new = g.dir / "v2.yaml"
    new.write_text("v2\n")
    live = str(g.dir / "conf" / "api.yaml")
    result = g.cli("stage", str(new), live, "-c", str(g.config), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (g.dir / "conf" / "api.yaml").read_text() == "v2\n"
    assert g.history("api", "config_applied") and g.history("api", "config_confirmed")
    assert g.history("api", "signal_sent")[-1]["signal"] == "SIGHUP"
    assert api_pid(g) == pid
    assert g.stop() == 0


BASE = """
[programs.api]
command = ["/bin/sleep", "100"]
"""


@pytest.mark.parametrize(
    ("extra", "restarts"),
    [
        ('environment = { A = "1" }', True),
        ('directory = "/var"', True),
        ("go_env = false", True),
        ('user = "nobody"', True),
        ('start_seconds = "3s"\nstop_timeout = "1s"\nautostart = false', False),
        ('[programs.api.limits]\nrss = "1GiB"', False),
        ('[programs.api.backoff]\nmax = "1m"', False),
        ('[programs.api.logs]\nmax_size = "1MiB"', False),
        ('[programs.api.ready]\ntcp = "127.0.0.1:1"', False),
        ('[[programs.api.config_files]]\npath = "x.yaml"', False),
    ],
)
def test_which_changes_restart(extra: str, restarts: bool) -> None:
    old = loads(BASE, "/tmp/app.toml").program("api")
    new = loads(BASE + extra + "\n", "/tmp/app.toml").program("api")
    assert old != new
    assert runs_differently(old, new) is restarts
