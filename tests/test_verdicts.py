"""The verdict (issue 13, DESIGN §4): a config version counts as applied only
when the program proves it took it, against a real gosup and the goapp fixture.

goapp (tests/fixtures/goapp/reload.go) behaves like prometheus: a config line
``refuse`` passes the validator, is refused on reload (the old config stays,
``goapp_config_last_reload_successful`` drops to 0) and exits 1 at start;
``crash`` is taken on reload and exits 1 at start; ``version N`` is
``goapp_config_version``. ``goapp -reload PID`` is a reload_command client,
like ``caddy reload``: exit 0 taken, 1 refused.

Each reason of the verdict is reproduced: reload_failed, unconfirmed,
not_ready, unhealthy, exited, crash_loop; then confirmed; then the real
prometheus and caddy where installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Gosup, free_port, wait_for

from supervisor import config as configmod
from supervisor.config import ProbeKind
from supervisor.files.confirmed import Confirmed

V1 = b"version 1\n"
V2 = b"version 2\n"
REFUSE = b"version 2\nrefuse\n"
CRASH = b"version 2\ncrash\n"
UNREADY = b"version 0\n"  # goapp_config_version >= 1 fails for it
OK_METRIC = "goapp_config_last_reload_successful == 1"
VERSION_METRIC = "goapp_config_version >= 1"


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def app(
    goapp: Path,
    port: int,
    *,
    program: str = "",
    file: str = "",
    probation: str = "1s",
    on_change: str = "reload",
    staging: str = "",
    sections: str = "",
) -> str:
    """One goapp serving HTTP on ``port`` and reading config/app.conf."""
    argv = [str(goapp), "-config", "config/app.conf", "-http", f"127.0.0.1:{port}"]
    args = ", ".join(json.dumps(a) for a in argv)
    return textwrap.dedent(f"""\
        [programs.api]
        command = [{args}]
        start_seconds = "200ms"
        stop_timeout = "5s"
        {program}
        [programs.api.backoff]
        initial = "100ms"
        max = "500ms"
        jitter = 0.0
        give_up_after = 3
        [programs.api.limits]
        go_metrics = "http://127.0.0.1:{port}/metrics"
        evidence = "sigquit"
        [[programs.api.config_files]]
        path = "config/app.conf"
        probation = "{probation}"
        on_change = "{on_change}"
        {staging}
        {file}
        {sections}
        """)


def live_file(g: Gosup, content: bytes = V1) -> Path:
    (g.dir / "config").mkdir(exist_ok=True)
    live = g.dir / "config" / "app.conf"
    live.write_bytes(content)
    return live


def stage(g: Gosup, content: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    new = g.dir / "incoming.conf"
    new.write_bytes(content)
    return g.cli("stage", *args, str(new), "config/app.conf", timeout=90)


def rolled_back(g: Gosup, reason: str) -> dict[str, Any]:
    return g.wait_event("config_rolled_back", "api", where=lambda r: r["reason"] == reason)[0]


def back_to(live: Path, content: bytes) -> None:
    """The live file holds ``content`` again (the record comes before the restore)."""
    wait_for(lambda: live.read_bytes() == content, what=f"{live.name} restored")


def serving(g: Gosup, content: bytes = V1, timeout: float = 15.0) -> tuple[Path, int]:
    """gosup started with ``content`` live: the live file and api's first pid."""
    live = live_file(g, content)
    g.start()
    return live, g.running_pid("api", timeout=timeout)


def refused(
    g: Gosup, live: Path, content: bytes, reason: str, *args: str, was: bytes = V1
) -> subprocess.CompletedProcess[str]:
    """Stage ``content``: `gosup stage` exits 1 for ``reason`` and ``was`` is live again."""
    out = stage(g, content, *args)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"rolled back: {reason}" in out.stdout
    back_to(live, was)
    return out


# -- config --------------------------------------------------------------------------


def test_reload_command_and_confirm_parse(tmp_path: Path) -> None:
    cfg = configmod.loads(
        textwrap.dedent("""
        [programs.api]
        command = ["./api"]
        reload_command = ["./api", "-reload", "{pid}"]
        [programs.api.limits]
        go_metrics = "http://127.0.0.1:6060/metrics"
        [[programs.api.config_files]]
        path = "api.yaml"
        confirm = { metric = "api_config_last_reload_successful == 1" }
        [[programs.api.config_files]]
        path = "other.yaml"
        confirm = { http = "http://127.0.0.1:6060/readyz", interval = "250ms", failures = 5 }
        """),
        tmp_path / "app.toml",
    )
    spec = cfg.program("api")
    assert spec.reload_command == ("./api", "-reload", "{pid}")
    first, second = spec.config_files
    assert first.confirm is not None and first.confirm.kind is ProbeKind.METRIC
    assert (first.confirm.interval, first.confirm.timeout, first.confirm.failures) == (1.0, 2.0, 2)
    assert second.confirm is not None and second.confirm.kind is ProbeKind.HTTP
    assert (second.confirm.interval, second.confirm.failures) == (0.25, 5)


def test_confirm_errors_name_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(configmod.ConfigError) as err:
        configmod.loads(
            textwrap.dedent("""
            [programs.api]
            command = ["./api"]
            reload_command = []
            [[programs.api.config_files]]
            path = "api.yaml"
            confirm = { metric = "ok == 1", within = "3s" }
            [[programs.api.config_files]]
            path = "b.yaml"
            confirm = { metric = "ok == 1" }
            """),
            tmp_path / "app.toml",
        )
    text = str(err.value)
    assert "app.toml: programs.api.reload_command: must not be empty" in text
    assert "programs.api.config_files[0].confirm.within: unknown key" in text
    assert "programs.api.config_files[1].confirm: a metric probe reads go_metrics" in text


# -- each reason ----------------------------------------------------------------------


def test_reload_command_refusal_is_rolled_back(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    """caddy's case: a reload command that says no. Before: `applied`, exit 0."""
    reload = f'reload_command = ["{goapp}", "-reload", "{{pid}}"]'
    g = gosup_factory(app(goapp, free_port(), program=reload))
    live, pid = serving(g)
    out = refused(g, live, REFUSE, "reload_failed")
    assert "refused" in out.stdout  # what the reload command said
    rec = rolled_back(g, "reload_failed")
    assert rec["sha256"] == sha(REFUSE) and rec["restored_sha256"] == sha(V1)
    assert rec["exit_code"] == 1
    assert g.history("api", "running")[-1]["pid"] == pid  # a reload: the same run
    assert not g.history("api", "signal_sent")  # the command replaces the signal
    # A good version through the same command is confirmed.
    out = stage(g, V2)
    assert out.returncode == 0, out.stdout
    assert f"confirmed (sha256 {sha(V2)})" in out.stdout


def test_silent_reload_failure_is_unconfirmed(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    """prometheus' case: SIGHUP, the program keeps its old config, the metric says 0."""
    confirm = f'confirm = {{ metric = "{OK_METRIC}", interval = "200ms" }}'
    g = gosup_factory(app(goapp, free_port(), file=confirm))
    live, _ = serving(g)
    began = time.monotonic()
    out = stage(g, REFUSE)
    took = time.monotonic() - began
    assert out.returncode == 1, out.stdout
    assert "rolled back: unconfirmed" in out.stdout
    assert "the sample is 0" in out.stdout
    rec = rolled_back(g, "unconfirmed")
    assert rec["restored_sha256"] == sha(V1)
    # the probe's own verdict comes first (DESIGN §5: probe_failed, probe confirm)
    (failed,) = g.history("api", "probe_failed")
    assert (failed["probe"], failed["target"]) == ("confirm", OK_METRIC)
    assert "the sample is 0" in failed["error"] and failed["failures"] >= 1
    events = [r["event"] for r in g.history("api")]
    assert events.index("probe_failed") < events.index("config_rolled_back")
    back_to(live, V1)
    # The restored file is reloaded again: the program says its reload worked.
    wait_for(lambda: len(g.history("api", "signal_sent")) == 2, what="the second reload")
    assert not [r for r in g.history("api", "config_confirmed") if r["sha256"] == sha(REFUSE)]
    assert took < 20  # two failed probes, not the whole wait
    assert not g.history("api", "exited")


def test_reload_that_breaks_readiness_is_not_ready(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    ready = f'[programs.api.ready]\nmetric = "{VERSION_METRIC}"\ninterval = "100ms"\n'
    g = gosup_factory(app(goapp, free_port(), sections=ready, probation="300ms"))
    live, pid = serving(g)
    refused(g, live, UNREADY, "not_ready")
    assert g.history("api", "running")[-1]["pid"] == pid


def test_restart_that_never_gets_ready_is_not_ready(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    ready = (
        f'[programs.api.ready]\nmetric = "{VERSION_METRIC}"\ninterval = "100ms"\nwithin = "1s"\n'
    )
    g = gosup_factory(app(goapp, free_port(), sections=ready, on_change="restart"))
    live, first = serving(g)
    refused(g, live, UNREADY, "not_ready")
    wait_for(lambda: g.history("api", "running")[-1]["pid"] != first, what="a run of V1")
    assert any(r.get("reason") == "not_ready" for r in g.history("api", "exited"))


def test_reload_that_fails_liveness_is_unhealthy(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    live_probe = (
        f'[programs.api.live]\nmetric = "{VERSION_METRIC}"\ninterval = "150ms"\nfailures = 2\n'
    )
    g = gosup_factory(app(goapp, free_port(), sections=live_probe, probation="5s"))
    live, first = serving(g)
    refused(g, live, UNREADY, "unhealthy")
    records = g.history("api")
    events = [r["event"] for r in records]
    assert events.index("probe_failed") < events.index("config_rolled_back")
    # The restart the liveness probe asked for starts the restored version.
    wait_for(lambda: g.history("api", "running")[-1]["pid"] != first, what="a new run")
    back_to(live, V1)


def test_restart_into_a_refused_config_is_exited(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    """The issue's second case. Before: `applied`, exit 0 in 0.2 s, rollback 94 ms later."""
    g = gosup_factory(app(goapp, free_port(), on_change="restart"))
    live, _ = serving(g)
    out = refused(g, live, REFUSE, "exited", "--wait", "25s")
    assert "exit code 1" in out.stdout
    g.wait_event("running", "api", count=2)


def test_good_version_is_confirmed_and_remembered(
    gosup_factory: Callable[..., Gosup], goapp: Path
) -> None:
    confirm = f'confirm = {{ metric = "{OK_METRIC}", interval = "200ms" }}'
    g = gosup_factory(app(goapp, free_port(), file=confirm, probation="500ms"))
    live, _ = serving(g)
    out = stage(g, V2)
    assert out.returncode == 0, out.stdout
    assert f"confirmed (sha256 {sha(V2)}) after 0.5s of probation" in out.stdout
    rec = g.wait_event("config_confirmed", "api", where=lambda r: r["sha256"] == sha(V2))[0]
    assert rec["path"] == str(live) and rec["probation_s"] == 0.5
    kept = Confirmed.of(g.state_dir, "api", live)
    wait_for(lambda: kept.sha256() == sha(V2), what="the confirmed copy")
    assert kept.content.read_bytes() == V2
    out = stage(g, V2)  # the same version again: nothing to judge
    assert out.returncode == 0 and "unchanged" in out.stdout
    out = stage(g, V1, "--no-wait")
    assert out.returncode == 0 and "--no-wait" in out.stdout


def test_verdict_default_wait_covers_probation(tmp_path: Path, goapp: Path) -> None:
    from supervisor.cli.stage import verdict_budget

    cfg = configmod.loads(app(goapp, 8080, probation="30s"), tmp_path / "app.toml")
    spec = cfg.program("api")
    assert verdict_budget(spec, spec.config_files[0]) >= 30 + 10


# -- crash_loop ------------------------------------------------------------------------


@pytest.mark.parametrize("staging", ["", "staging = false"])
def test_crash_loop_restores_last_confirmed_version(
    gosup_factory: Callable[..., Gosup], goapp: Path, staging: str
) -> None:
    """A version the program took on reload but cannot start with (goapp's `crash`,
    or a file edited in place): the next restart crash-loops; before FATAL the
    last confirmed version comes back and the program gets one more series."""
    g = gosup_factory(app(goapp, free_port(), probation="300ms", on_change="none", staging=staging))
    live, pid = serving(g)
    # The version it started with is confirmed once the run stayed up probation.
    g.wait_event("config_confirmed", "api", where=lambda r: r["sha256"] == sha(V1))
    if staging:
        with open(live, "wb") as f:  # in place
            f.write(CRASH)
    else:
        out = stage(g, CRASH, "--no-wait")
        assert out.returncode == 0, out.stdout
    g.wait_event("config_applied", "api", where=lambda r: r["sha256"] == sha(CRASH))
    os.kill(pid, signal.SIGKILL)
    rec = rolled_back(g, "crash_loop")
    assert rec["sha256"] == sha(CRASH) and rec["restored_sha256"] == sha(V1)
    back_to(live, V1)
    wait_for(lambda: g.history("api", "running")[-1]["pid"] != pid, what="a run of V1")
    assert not g.history("api", "fatal")
    crashes = [r for r in g.history("api", "exited") if r.get("exit_code") == 1]
    # give_up_after = 3 failed runs (the killed one, two crashes), then the restore
    assert len(crashes) == 2


# -- the real programs from the issue ------------------------------------------------------


def test_prometheus_refusing_a_config_on_reload(
    gosup_factory: Callable[..., Gosup], tmp_path: Path
) -> None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prometheus or not promtool:
        pytest.skip("Debian's prometheus and promtool are not installed (the goapp case above)")
    port = free_port()
    good = "global:\n  scrape_interval: 15s\n"
    bad = good + "remote_write:\n  - url: http://127.0.0.1:1/\n    tls_config:\n"
    bad += "      ca_file: /nonexistent/ca.pem\n"
    argv = [prometheus, "--config.file=config/app.conf", f"--web.listen-address=127.0.0.1:{port}"]
    argv += ["--storage.tsdb.path=data"]
    args = ", ".join(json.dumps(a) for a in argv)
    g = gosup_factory(
        textwrap.dedent(f"""\
        [programs.api]
        command = [{args}]
        start_seconds = "1s"
        [programs.api.limits]
        go_metrics = "http://127.0.0.1:{port}/metrics"
        [programs.api.ready]
        http = "http://127.0.0.1:{port}/-/ready"
        within = "60s"
        [[programs.api.config_files]]
        path = "config/app.conf"
        validate = ["{promtool}", "check", "config", "{{file}}"]
        probation = "3s"
        confirm = {{ metric = "prometheus_config_last_reload_successful == 1" }}
        """)
    )
    live, _ = serving(g, good.encode(), timeout=60)
    refused(g, live, bad.encode(), "unconfirmed", was=good.encode())


def test_caddy_reload_command(gosup_factory: Callable[..., Gosup], tmp_path: Path) -> None:
    caddy = shutil.which("caddy")
    if not caddy:
        pytest.skip("caddy is not installed (the goapp -reload case above stands in for it)")
    port, admin = free_port(), free_port()

    def caddyfile(body: str) -> bytes:
        return f"{{\n  admin 127.0.0.1:{admin}\n}}\n:{port} {{\n  {body}\n}}\n".encode()

    conf = "config/app.conf"
    g = gosup_factory(
        textwrap.dedent(f"""\
        [programs.api]
        command = ["{caddy}", "run", "--config", "{conf}", "--adapter", "caddyfile"]
        reload_command = ["{caddy}", "reload", "--config", "{conf}", "--adapter", "caddyfile",
                          "--address", "127.0.0.1:{admin}"]
        start_seconds = "1s"
        [programs.api.ready]
        http = "http://127.0.0.1:{port}/"
        [[programs.api.config_files]]
        path = "{conf}"
        probation = "1s"
        """)
    )
    v1 = caddyfile('respond "v1"')
    live, _ = serving(g, v1, timeout=30)
    refused(g, live, caddyfile("this_is_not_a_directive"), "reload_failed", was=v1)
    out = stage(g, caddyfile('respond "v2"'))
    assert out.returncode == 0, out.stdout
