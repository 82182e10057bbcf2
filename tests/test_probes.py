"""Readiness and liveness probes against real processes (issue 12).

The Go fixture's HTTP server is told by flags when /readyz answers
(-ready-delay, -never-ready), when every handler but pprof deadlocks
(-hang-after) and how it fails at start (-fail-start).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, free_port, tagged_processes, wait_for

from supervisor import config as configmod
from supervisor.config import MetricCheck, ProbeKind
from supervisor.config.probespec import parse_metric_check
from supervisor.core.program import output_tail
from supervisor.health import evidence, probes


def program(name: str, argv: list[str], extra: str = "") -> str:
    args = ", ".join(json.dumps(str(a)) for a in argv)
    return f'[programs.{name}]\ncommand = [{args}]\nstart_seconds = "200ms"\n' + textwrap.dedent(
        extra
    )


def web(goapp: Path, port: int, *flags: str) -> list[str]:
    return [str(goapp), "-http", f"127.0.0.1:{port}", *flags]


def status(g: Any, name: str) -> dict[str, Any]:
    out = g.cli("status", "--json", "-c", str(g.config))
    assert out.returncode == 0, out.stderr
    programs = json.loads(out.stdout)["programs"]
    found: dict[str, Any] = next(p for p in programs if p["name"] == name)
    return found


# -- config ----------------------------------------------------------------------


def _load(text: str, tmp_path: Path) -> configmod.AppConfig:
    return configmod.loads(textwrap.dedent(text), tmp_path / "app.toml")


def test_probes_parse_with_their_defaults(tmp_path: Path) -> None:
    cfg = _load(
        """
        [programs.api]
        command = ["./api"]
        [programs.api.limits]
        go_metrics = "http://127.0.0.1:6060/metrics"
        [programs.api.ready]
        metric = 'app_ready{shard="a", zone="x"} >= 1'
        within = "5s"
        [programs.api.live]
        tcp = "127.0.0.1:8080"
        failures = 2
        """,
        tmp_path,
    )
    spec = cfg.program("api")
    assert spec.ready is not None and spec.live is not None
    assert spec.ready.kind is ProbeKind.METRIC
    assert spec.ready.target == MetricCheck("app_ready", (("shard", "a"), ("zone", "x")), ">=", 1)
    assert (spec.ready.interval, spec.ready.timeout, spec.ready.within) == (0.25, 1.0, 5.0)
    assert spec.live.kind is ProbeKind.TCP
    assert (spec.live.interval, spec.live.timeout, spec.live.failures) == (5.0, 2.0, 2)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("[programs.api.ready]\ninterval = '1s'", "programs.api.ready: needs exactly one target"),
        (
            "[programs.api.live]\nhttp = 'http://127.0.0.1:1/'\ntcp = '127.0.0.1:1'",
            "found: http, tcp",
        ),
        ("[programs.api.ready]\nmetric = 'up >= 1'", "programs.api.ready: a metric probe reads"),
        ("[programs.api.ready]\nhttp = 'http://127.0.0.1:1/'\nfailures = 2", "unknown key"),
        ("[programs.api.live]\nexec = []", "programs.api.live.exec: must not be empty"),
        (
            "[[programs.api.config_files]]\npath = 'a.conf'\n"
            "validate = ['./api', '-check', '{path}']",
            "validate: must name the staged file as {file}",
        ),
    ],
)
def test_probe_and_validator_mistakes_are_config_errors(
    tmp_path: Path, section: str, message: str
) -> None:
    with pytest.raises(configmod.ConfigError) as err:
        _load(f'[programs.api]\ncommand = ["./api"]\n{section}\n', tmp_path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "text", ["up", "up >= x", "up{a=b} == 1", "up ~ 1", "up >= nan", '{a="b"} > 1']
)
def test_bad_metric_expressions_say_so(text: str) -> None:
    with pytest.raises(ValueError):
        parse_metric_check(text)


def test_metric_verdict_reads_one_sample_by_name_and_labels() -> None:
    body = textwrap.dedent(
        """\
        # TYPE app_ready gauge
        app_ready{shard="a"} 0
        app_ready{shard="b"} 1
        # TYPE app_reloads counter
        app_reloads_total 3
        """
    ).encode()
    assert probes.metric_verdict(parse_metric_check('app_ready{shard="b"} == 1'), body) is None
    assert "is 0" in str(
        probes.metric_verdict(parse_metric_check('app_ready{shard="a"} > 0'), body)
    )
    assert probes.metric_verdict(parse_metric_check("app_reloads_total >= 3"), body) is None
    assert "no such sample" in str(probes.metric_verdict(parse_metric_check("nope < 1"), body))


def test_output_tail_keeps_whole_last_lines_within_2_kib() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    tail = output_tail(text)
    assert len(tail.encode()) <= 2048
    assert tail.endswith("line 999") and tail.splitlines()[0].startswith("line ")
    assert output_tail("only\n\n") == "only"


def test_only_goroutine_stacks_are_evidence(tmp_path: Path) -> None:
    dump = tmp_path / "d.txt"
    dump.write_bytes(b"SIGQUIT: quit\nPC=0x0\n\ngoroutine 1 [running]:\nmain.main()\n")
    assert evidence.verdict(dump, "sigquit") is None
    dump.write_bytes(b"SIGQUIT: quit\n\ngoroutine 0 gp=0xb2e700 m=0 mp=0xb2f8e0 [idle]:\n")
    assert evidence.verdict(dump, "sigquit") is None
    dump.write_bytes(b'{"level":"info","msg":"quitting"}\n')
    assert "no goroutine stacks in the 34 bytes" in str(evidence.verdict(dump, "sigquit"))


# -- exec probes leave nothing behind ----------------------------------------------


def test_a_hanging_exec_probe_is_killed_as_a_group_at_its_timeout(
    tmp_path: Path, no_leftover_processes: str
) -> None:
    spec = _load('[programs.api]\ncommand = ["./api"]\n', tmp_path).program("api")
    argv = ("sh", "-c", "sleep 60 & sleep 60")

    async def main() -> tuple[str | None, float]:
        loop = asyncio.get_running_loop()
        began = loop.time()
        ticks = 0

        async def ticker() -> None:  # the loop keeps running while the probe hangs
            nonlocal ticks
            while True:
                await asyncio.sleep(0.02)
                ticks += 1

        task = asyncio.create_task(ticker())
        result = await probes.run_exec(argv, spec, 0.5)
        task.cancel()
        assert ticks >= 10
        return result, loop.time() - began

    error, took = asyncio.run(main())
    assert error is not None and "no verdict within 0.5s (killed)" in error
    assert took < 10.0  # killed at 0.5 s, not left to its 60 s (room for a loaded machine)
    wait_for(lambda: not tagged_processes(no_leftover_processes), 5, "the probe's group gone")
    passed = asyncio.run(probes.run_exec(("sh", "-c", "exit 0"), spec, 2.0))
    failed = asyncio.run(probes.run_exec(("sh", "-c", "echo no db; exit 3"), spec, 2.0))
    assert passed is None and failed == "exec sh: exit 3: no db"


# -- readiness ---------------------------------------------------------------------


def test_running_waits_for_the_readiness_probe(gosup_factory: Any, goapp: Path) -> None:
    port = free_port()
    g = gosup_factory(
        program(
            "api",
            web(goapp, port, "-ready-delay", "1500ms"),
            f"""
            [programs.api.ready]
            http = "http://127.0.0.1:{port}/readyz"
            interval = "100ms"
            within = "20s"
            """,
        )
    ).start()
    started = g.wait_event("started", "api")[0]
    running = g.wait_event("running", "api")[0]
    from test_lifecycle import ts

    assert ts(running) - ts(started) >= 1.4  # not start_seconds (200ms): the probe
    assert status(g, "api")["state"] == "RUNNING"
    assert not g.history("api", "probe_failed")
    assert g.stop() == 0


def test_never_ready_is_a_failed_start_that_backs_off_to_fatal(
    gosup_factory: Any, goapp: Path
) -> None:
    port = free_port()
    g = gosup_factory(
        program(
            "api",
            web(goapp, port, "-never-ready"),
            f"""
            autostart = false
            [programs.api.ready]
            http = "http://127.0.0.1:{port}/readyz"
            interval = "100ms"
            within = "600ms"
            [programs.api.backoff]
            initial = "100ms"
            give_up_after = 2
            """,
        )
    ).start()
    g.wait_event("supervisor_started")
    start = g.cli("start", "api", "-c", str(g.config))
    assert start.returncode == 1  # the operator's start failed, and says why
    assert "not_ready" in start.stdout + start.stderr
    fatal = g.wait_event("fatal", "api")[0]
    assert fatal["reason"] == "not_ready" and fatal["attempts"] == 2
    failed = g.history("api", "probe_failed")
    assert len(failed) == 2 and failed[0]["probe"] == "ready"
    assert "HTTP 503" in failed[0]["error"] and failed[0]["target"].endswith("/readyz")
    exits = g.history("api", "exited")
    assert [e["reason"] for e in exits] == ["not_ready", "not_ready"]
    assert g.history("api", "backoff")
    shown = g.cli("status", "-c", str(g.config))
    assert "FATAL" in shown.stdout and "not_ready" in shown.stdout
    assert g.stop() == 0


# -- liveness ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pprof", "sigquit"])
def test_a_hung_server_is_restarted_with_a_dump_of_where_it_hung(
    gosup_factory: Any, goapp: Path, kind: str
) -> None:
    port = free_port()
    limits = (
        f'[programs.api.limits]\ngo_metrics = "http://127.0.0.1:{port}/metrics"\n'
        if kind == "pprof"
        else ""
    )
    g = gosup_factory(
        program(
            "api",
            web(goapp, port, "-hang-after", "1s"),
            f"""
            [programs.api.live]
            http = "http://127.0.0.1:{port}/healthz"
            interval = "200ms"
            timeout = "300ms"
            failures = 3
            [programs.api.backoff]
            initial = "100ms"
            """,
        )
        + limits
    ).start()
    first = g.running_pid("api")
    failed = g.wait_event("probe_failed", "api")[0]
    assert failed["probe"] == "live" and failed["failures"] == 3
    assert "no answer within 0.3s" in failed["error"]
    saved = g.wait_event("evidence_saved", "api")[0]
    assert saved["kind"] == kind and saved["reason"] == "unhealthy"
    assert "main.hangingHandler" in Path(saved["path"]).read_text()
    assert g.wait_event("restart_requested", "api")[0]["reason"] == "unhealthy"
    g.wait_event("started", "api", count=2)
    assert wait_for(lambda: g.running_pid("api") != first, 10, "a new process")
    assert g.stop() == 0


def test_an_unhealthy_loop_backs_off_to_fatal(gosup_factory: Any, goapp: Path) -> None:
    """Unhealthy right after every start: failed runs, not an endless restart loop."""
    port = free_port()
    g = gosup_factory(
        program(
            "api",
            web(goapp, port),
            f"""
            [programs.api.live]
            http = "http://127.0.0.1:{port}/nope-404"
            interval = "100ms"
            failures = 2
            [programs.api.limits]
            evidence = "none"
            [programs.api.backoff]
            initial = "100ms"
            give_up_after = 3
            """,
        )
    ).start()
    fatal = g.wait_event("fatal", "api", timeout=30)[0]
    assert fatal["reason"] == "unhealthy" and fatal["attempts"] == 3
    assert [e.get("reason") for e in g.history("api", "exited")] == ["unhealthy"] * 3
    assert len(g.history("api", "started")) == 3
    assert "unhealthy" in g.cli("status", "-c", str(g.config)).stdout
    assert g.stop() == 0


def test_a_leak_limit_below_the_baseline_ends_in_fatal(gosup_factory: Any, goapp: Path) -> None:
    port = free_port()
    g = gosup_factory(
        program(
            "api",
            web(goapp, port),
            f"""
            [programs.api.limits]
            interval = "200ms"
            sustain = 1
            goroutines = 1
            evidence = "none"
            go_metrics = "http://127.0.0.1:{port}/metrics"
            [programs.api.backoff]
            initial = "100ms"
            give_up_after = 2
            """,
        )
    ).start()
    fatal = g.wait_event("fatal", "api", timeout=30)[0]
    assert fatal["reason"] == "leak"
    assert len(g.history("api", "limit_exceeded")) == 2
    assert status(g, "api")["last_exit"]["reason"] == "leak"
    assert g.stop() == 0


# -- reasons, not just codes -------------------------------------------------------


def test_a_failed_start_carries_its_last_words(gosup_factory: Any, goapp: Path) -> None:
    message = "listen tcp :80: bind: permission denied"
    g = gosup_factory(
        program(
            "api",
            [str(goapp), "-fail-start", message],
            '[programs.api.backoff]\ninitial = "100ms"\ngive_up_after = 1\n',
        )
    ).start()
    g.wait_event("fatal", "api")
    exited = g.history("api", "exited")[0]
    assert exited["exit_code"] == 1 and exited["output_tail"] == message
    assert message[:30] in g.cli("status", "-c", str(g.config)).stdout
    assert g.stop() == 0


def test_a_sigquit_that_brings_no_stacks_is_evidence_failed(gosup_factory: Any) -> None:
    """A program that traps SIGQUIT (caddy does) leaves a log line, not a dump."""
    port = free_port()
    script = "trap 'echo quitting >&2; exit 0' QUIT; while :; do sleep 0.05; done"
    g = gosup_factory(
        program(
            "trapper",
            ["sh", "-c", script],
            f"""
            [programs.trapper.live]
            tcp = "127.0.0.1:{port}"
            interval = "100ms"
            failures = 1
            """,
        )
    ).start()
    failed = g.wait_event("evidence_failed", "trapper")[0]
    assert failed["kind"] == "sigquit" and "quitting" in failed["error"]
    assert not g.history("trapper", "evidence_saved")
    assert g.stop() == 0


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed")
def test_caddy_sigquit_is_not_recorded_as_evidence(gosup_factory: Any, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    (tmp_path / "Caddyfile").write_text(
        f"{{\n admin 127.0.0.1:{admin}\n}}\nhttp://127.0.0.1:{port} {{\n respond ok\n}}\n"
    )
    g = gosup_factory(
        program(
            "caddy",
            [str(shutil.which("caddy")), "run", "--config", "Caddyfile", "--adapter", "caddyfile"],
            f"""
            [programs.caddy.live]
            http = "http://127.0.0.1:{port}/"
            [programs.caddy.limits]
            interval = "200ms"
            sustain = 1
            goroutines = 1
            evidence = "sigquit"
            go_metrics = "http://127.0.0.1:{admin}/metrics"
            """,
        )
    ).start()
    failed = g.wait_event("evidence_failed", "caddy", timeout=30)[0]
    assert failed["kind"] == "sigquit"
    assert not g.history("caddy", "evidence_saved")
    assert g.stop() == 0


# -- gosup check -------------------------------------------------------------------


def test_check_catches_a_missing_binary_unless_a_build_makes_it(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(program("api", ["./bin/api"]) + program("ok", [str(goapp)]))
    out = g.cli("check", str(g.config))
    assert out.returncode == 2
    assert "programs.api.command: binary './bin/api' not found" in out.stderr
    g.config.write_text(
        program("api", ["./bin/api"], '[programs.api.build]\ncommand = ["go", "build"]\n')
    )
    out = g.cli("check", str(g.config))
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "[build] is expected to produce it" in out.stderr
    g.config.write_text(program("api", ["sh", "-c", "true"]) + "[programs.api.ready]\n")
    out = g.cli("check", str(g.config))
    assert out.returncode == 2 and "needs exactly one target" in out.stderr


def test_docs_example_config_parses() -> None:
    """config.toml.example shows [ready] and [live] and must stay valid."""
    text = (ROOT / "config.toml.example").read_text()
    assert "[programs.demo.ready]" in text and "[programs.demo.live]" in text
    configmod.loads(text, ROOT / "config.toml.example")
