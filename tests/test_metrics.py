"""Prometheus /metrics: a real gosup scraped over HTTP, the collector on its
own, and the shipped alert rules and dashboard checked against the metrics
that really exist."""

from __future__ import annotations

import collections
import http.client
import importlib.util
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ROOT, free_port, wait_for
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.core.states import ProcessState as S
from supervisor.history import History
from supervisor.service import metrics

DOCS = ROOT / "docs"
DESIGN_NAMES = {
    "gosup_program_up",
    "gosup_program_state",
    "gosup_program_restarts_total",
    "gosup_program_rss_bytes",
    "gosup_program_open_fds",
    "gosup_program_threads",
    "gosup_program_connections",
    "gosup_program_goroutines",
    "gosup_program_heap_inuse_bytes",
    "gosup_config_changes_total",
}


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def _program(name: str, binary: Path, *args: str, extra: str = "") -> str:
    argv = ", ".join(f'"{a}"' for a in (str(binary), *args))
    return f'[programs.{name}]\ncommand = [{argv}]\nstart_seconds = "200ms"\n{extra}\n'


# -- a real gosup ------------------------------------------------------------------------


def test_scrape_after_a_crash_counts_the_restart(gosup_factory: Any, goapp: Path) -> None:
    port = free_port()
    config = (
        f'[supervisor]\nmetrics_listen = "127.0.0.1:{port}"\n'
        + _program("api", goapp, extra='[programs.api.limits]\ninterval = "200ms"')
        + _program(
            "crashy",
            goapp,
            "-mode",
            "exit",
            "-code",
            "2",
            "-after",
            "300ms",
            extra='[programs.crashy.backoff]\ninitial = "100ms"\nmax = "200ms"',
        )
    )
    g = gosup_factory(config).start()
    g.running_pid("api")
    g.wait_event("backoff", "crashy", count=2)

    status, ctype, text = get(port)
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    found = samples(text)
    restarts = value(found, "gosup_program_restarts_total", program="crashy", reason="crash")
    assert restarts is not None and 2 <= restarts <= len(g.history("crashy", "backoff"))
    assert value(found, "gosup_program_restarts_total", program="api", reason="crash") == 0
    assert value(found, "gosup_program_restarts_total", program="api", reason="leak") == 0
    assert value(found, "gosup_program_up", program="api") == 1
    assert value(found, "gosup_program_state", program="api") == 2  # RUNNING
    # gosup's own process figures
    rss = value(found, "process_resident_memory_bytes")
    assert rss is not None and rss > 0
    assert value(found, "process_open_fds")

    if importlib.util.find_spec("supervisor.health.resources") is not None:
        # The resource sampler fills program.observations; the scrape reads them.
        def sampled() -> dict[Any, float] | None:
            now = samples(get(port)[2])
            return now if value(now, "gosup_program_rss_bytes", program="api") else None

        now = wait_for(sampled, 20, "gosup_program_rss_bytes of api")
        assert value(now, "gosup_program_threads", program="api")
        assert value(now, "gosup_program_open_fds", program="api")

    assert g.stop() == 0


def test_endpoint_answers_only_get_metrics(gosup_factory: Any, goapp: Path) -> None:
    port = free_port()
    g = gosup_factory(f'[supervisor]\nmetrics_listen = "127.0.0.1:{port}"\n').start()
    wait_for(lambda: _answers(port), 20, "the metrics endpoint")
    assert get(port, "/")[0] == 404
    assert get(port, "/metrics", method="POST")[0] == 405
    status, _, body = get(port, "/metrics", method="HEAD")
    assert (status, body) == (200, "")
    assert get(port, "/metrics?name[]=x")[0] == 200
    # A client that connects and says nothing does not hold up the next one.
    with socket.create_connection(("127.0.0.1", port)):
        assert get(port)[0] == 200
    assert g.stop() == 0


def _answers(port: int) -> bool:
    try:
        return get(port)[0] == 200
    except OSError:
        return False


def test_a_busy_metrics_port_is_an_error_naming_it(gosup_factory: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        g = gosup_factory(f'[supervisor]\nmetrics_listen = "127.0.0.1:{port}"\n').start()
        assert g.proc is not None
        assert g.proc.wait(30) != 0
    assert f"metrics_listen 127.0.0.1:{port}" in g.log()


# -- the collector on its own ----------------------------------------------------------


def fake_program(name: str, state: S, **figures: Any) -> SimpleNamespace:
    return SimpleNamespace(
        name=name,
        state=state,
        restarts=collections.Counter(),
        observations=SimpleNamespace(figures=figures),
        spec=SimpleNamespace(config_files=()),
    )


def fake_supervisor(tmp_path: Path, *programs: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(
        programs={p.name: p for p in programs}, history=History(tmp_path / "history.jsonl")
    )


def test_collector_reads_state_figures_and_counts_config_changes(tmp_path: Path) -> None:
    api = fake_program(
        "api",
        S.RUNNING,
        rss_bytes=1 << 20,
        open_fds=12,
        threads=7,
        connections=3,
        goroutines=40,
        heap_inuse_bytes=4096,
        scrape_error="ignored: not a number",
    )
    api.restarts.update({"crash": 2, "leak": 1})
    api.spec.config_files = ("config/api.yaml",)
    worker = fake_program("worker", S.FATAL)
    sup = fake_supervisor(tmp_path, api, worker)
    registry, collector = metrics.build_registry(sup)  # type: ignore[arg-type]
    sup.history.add_listener(collector.on_record)
    sup.history.record("config_applied", "api", path="a", sha256="x", previous_sha256="y")
    sup.history.record("config_applied", "api", path="a", sha256="z", previous_sha256="x")
    sup.history.record("config_rejected", "api", path="a", reason="missing_checksum")
    sup.history.record("started", "api", pid=1, attempt=1, binary_sha256="x")  # not counted
    sup.history.close()

    found = samples(generate_latest(registry).decode())
    assert value(found, "gosup_program_up", program="api") == 1
    assert value(found, "gosup_program_up", program="worker") == 0
    assert value(found, "gosup_program_state", program="worker") == 6  # FATAL
    assert value(found, "gosup_program_restarts_total", program="api", reason="crash") == 2
    assert value(found, "gosup_program_restarts_total", program="api", reason="leak") == 1
    assert value(found, "gosup_program_restarts_total", program="api", reason="config") == 0
    assert value(found, "gosup_program_rss_bytes", program="api") == 1 << 20
    assert value(found, "gosup_program_heap_inuse_bytes", program="api") == 4096
    assert value(found, "gosup_program_goroutines", program="api") == 40
    assert value(found, "gosup_program_rss_bytes", program="worker") is None  # not sampled
    changes = {
        result: value(found, "gosup_config_changes_total", program="api", result=result)
        for result in ("applied", "rejected", "confirmed", "rolled_back_unconfirmed")
    }
    assert changes == {"applied": 2, "rejected": 1, "confirmed": 0, "rolled_back_unconfirmed": 0}
    assert value(found, "gosup_config_changes_total", program="worker", result="applied") is None


def exposed_names(tmp_path: Path) -> set[str]:
    """Every metric family name a gosup exposes (figures included)."""
    figures = dict.fromkeys(metrics.FIGURES, 1)
    sup = fake_supervisor(tmp_path, fake_program("api", S.RUNNING, **figures))
    sup.programs["api"].spec.config_files = ("x",)
    registry, _ = metrics.build_registry(sup)  # type: ignore[arg-type]
    sup.history.close()
    text = generate_latest(registry).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    # Counters are exposed with _total and referred to that way in PromQL.
    return names | {f"{n}_total" for n in names}


def test_metric_names_are_the_design_ones(tmp_path: Path) -> None:
    names = exposed_names(tmp_path)
    assert {n for n in names if n.startswith("gosup_")} >= DESIGN_NAMES


# -- shipped alert rules and dashboard ---------------------------------------------------

METRIC_RE = re.compile(r"\b((?:gosup|process)_[a-z_]+)\b")


def test_alert_rules_and_dashboard_use_only_exposed_metrics(tmp_path: Path) -> None:
    names = exposed_names(tmp_path)
    rules = METRIC_RE.findall((DOCS / "alerts.yml").read_text())
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set(rules) | {m for e in exprs for m in METRIC_RE.findall(e)}
    assert used, "no metric referenced"
    assert used <= names, used - names
    # Every DESIGN metric is on the dashboard.
    assert {m for e in exprs for m in METRIC_RE.findall(e)} >= DESIGN_NAMES


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def test_promtool_accepts_the_alert_rules() -> None:
    run = subprocess.run(
        [_promtool(), "check", "rules", str(DOCS / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


LABELS = {"job": "gosup", "instance": "h1", "program": "api"}


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    text = ", ".join(f'{k}="{v}"' for k, v in {**LABELS, **labels}.items())
    return {"series": f"{metric}{{{text}}}", "values": values}


def expect(alert: str, severity: str, annotations: dict[str, str], **labels: str) -> dict[str, Any]:
    exp = {"exp_labels": {"severity": severity, **LABELS, **labels}, "exp_annotations": annotations}
    return {"eval_time": "7m", "alertname": alert, "exp_alerts": [exp]}


HISTORY = "`gosup history --program api`"
# promtool reads JSON as the YAML it is.
RULE_TESTS = {
    "rule_files": ["alerts.yml"],
    "evaluation_interval": "1m",
    "tests": [
        {
            "interval": "1m",
            "input_series": [
                series("gosup_program_state", "2 2 3 6 6 6 6 6"),
                series("gosup_program_up", "1 1 0 0 0 0 0 0"),
                series("gosup_program_restarts_total", "0 1 2 3 4 5 6 7", reason="crash"),
                series("gosup_program_restarts_total", "0 0 0 0 1 1 1 1", reason="leak"),
                series(
                    "gosup_config_changes_total",
                    "0 0 0 0 0 1 1 1",
                    result="rolled_back_unconfirmed",
                ),
            ],
            "alert_rule_test": [
                expect(
                    "GosupProgramFatal",
                    "critical",
                    {
                        "summary": "api on h1 is FATAL: gosup gave up restarting it",
                        "description": f"Read {HISTORY}, fix, then `gosup start api`.",
                    },
                ),
                expect(
                    "GosupProgramCrashLooping",
                    "warning",
                    {
                        "summary": "api on h1 crashed more than 3 times in 15 minutes",
                        "description": f"{HISTORY} shows each exit and the Go crash it read.",
                    },
                    reason="crash",
                ),
                expect(
                    "GosupProgramLimitExceeded",
                    "warning",
                    {
                        "summary": "api on h1 was restarted for exceeding a resource limit",
                        "description": f"{HISTORY} names the metric (limit_exceeded)"
                        " and the evidence file.",
                    },
                    reason="leak",
                ),
                expect(
                    "GosupConfigRolledBack",
                    "critical",
                    {"summary": "Config of api on h1 was rolled back (rolled_back_unconfirmed)"},
                    result="rolled_back_unconfirmed",
                ),
                {"eval_time": "7m", "alertname": "GosupConfigRejected", "exp_alerts": []},
                {"eval_time": "7m", "alertname": "GosupProgramNotRunning", "exp_alerts": []},
            ],
        }
    ],
}


def test_alert_rules_fire_on_the_situations_they_name(tmp_path: Path) -> None:
    promtool = _promtool()
    shutil.copy(DOCS / "alerts.yml", tmp_path / "alerts.yml")
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(json.dumps(RULE_TESTS, indent=1))
    run = subprocess.run(
        [promtool, "test", "rules", tests.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
