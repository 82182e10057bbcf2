"""Resource watermarks (supervisor/health/resources.py: the sampler,
sampling.py: trees and hysteresis, watermarks.py: the leak response,
evidence.py, goenv.py), and what they show (supervisor/core/observations.py).

The hysteresis is tested with synthetic samples (no sleeping); everything
else with real Go programs (tests/fixtures/goapp: -leak-*, -spike-*), run
either by the real Program actor in this process next to the sampler
service, where the figures can be read directly, or under a real
``gosup run`` for the end-to-end promise: a leaking program is restarted
with a dump on disk and the reason in the history, a spiking one never.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import free_port, wait_for

from supervisor import config as configmod
from supervisor.config import LimitsSpec
from supervisor.core.observations import Observations
from supervisor.core.program import CommandError, Program, Restart, Start, Stop
from supervisor.health import goenv, resources, sampling
from supervisor.health.evidence import Dumps
from supervisor.health.sampling import Hysteresis
from supervisor.health.watermarks import LeakResponse
from supervisor.protocol import RequestError
from supervisor.service.daemon import Supervisor

# -- hysteresis, with synthetic samples ----------------------------------------------


def feed(h: Hysteresis, samples: list[dict[str, Any]]) -> list[sampling.Breach | None]:
    return [h.observe(s) for s in samples]


def test_a_limit_fires_only_after_sustain_samples_in_a_row() -> None:
    h = Hysteresis(LimitsSpec(sustain=3, goroutines=100))
    got = feed(h, [{"goroutines": g} for g in (150, 160, 170)])
    assert got[:2] == [None, None]
    assert got[2] == sampling.Breach("goroutines", 170, 100, 3, (150, 160, 170))


def test_a_sample_under_the_limit_starts_the_count_again() -> None:
    h = Hysteresis(LimitsSpec(sustain=3, rss=1000))
    samples = [2000, 2000, 999, 2000, 2000, 1000, 2000, 2000]  # at the limit is not over it
    assert feed(h, [{"rss_bytes": v} for v in samples]) == [None] * len(samples)
    assert h.pending() == {"rss": 2}
    assert h.observe({"rss_bytes": 3000}) == sampling.Breach(
        "rss", 3000, 1000, 3, (2000,) * 2 + (3000,)
    )


def test_a_missing_figure_neither_counts_nor_breaks_the_run() -> None:
    # A failed scrape is no reason to kill, and no alibi for a leak either.
    h = Hysteresis(LimitsSpec(sustain=2, goroutines=10, heap_inuse=10))
    assert feed(h, [{"goroutines": 50}, {}, {"heap_inuse_bytes": 1}]) == [None, None, None]
    assert h.pending() == {"goroutines": 1}
    assert h.observe({"goroutines": 60})  # the second sample over it


def test_a_spike_shorter_than_sustain_never_fires() -> None:
    h = Hysteresis(LimitsSpec(sustain=4, goroutines=100, threads=10))
    spike = [5, 5, 900, 900, 900, 5, 5, 900, 5] * 20
    assert not any(feed(h, [{"goroutines": g, "threads": 3} for g in spike]))


def test_fires_once_per_process_and_names_the_first_limit_reached() -> None:
    h = Hysteresis(LimitsSpec(sustain=2, open_fds=10, connections=5))
    got = feed(h, [{"open_fds": 11, "connections": 1}, {"open_fds": 12, "connections": 6}])
    assert got[1] is not None and got[1].metric == "open_fds"
    assert feed(h, [{"open_fds": 99, "connections": 99}] * 5) == [None] * 5


def test_no_limits_never_fire() -> None:
    h = Hysteresis(LimitsSpec(sustain=1))
    assert h.observe({"rss_bytes": 10**12, "goroutines": 10**9}) is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("threads = 0", "limits.threads: must be > 0"),
        ("connections = -1", "limits.connections: must be > 0"),
        ("heap_inuse = 0", "limits.heap_inuse: must be > 0"),
        ("rss = '0MiB'", "limits.rss: must be > 0"),
        ("interval = '-1s'", "limits.interval: duration '-1s' must not be negative"),
        ("sustain = -2", "limits.sustain: must be > 0"),
        ("dump_max_size = 0", "limits.dump_max_size: must be > 0"),
        ("go_metrics = 'http://192.0.2.1:6060/metrics'", "192.0.2.1 is not loopback"),
    ],
)
def test_bad_limits_are_config_errors(tmp_path: Path, line: str, message: str) -> None:
    text = f'[programs.api]\ncommand = ["./api"]\n[programs.api.limits]\n{line}\n'
    with pytest.raises(configmod.ConfigError) as info:
        configmod.loads(text, tmp_path / "app.toml")
    assert len(info.value.errors) == 1 and message in info.value.errors[0]


# -- figures --------------------------------------------------------------------------


def test_observations_show_the_sample_age_as_of_the_reading() -> None:
    obs = Observations()
    assert obs.status(100.0) == {}  # nothing known: nothing shown
    obs.go_env = {"GOMEMLIMIT": "460MiB"}
    obs.figures.update(rss_bytes=5, goroutines=7)
    obs.sampled(99.0)
    assert obs.status(102.5) == {
        "go_env": {"GOMEMLIMIT": "460MiB"}, "rss_bytes": 5, "goroutines": 7,
        "last_sample_age_s": 3.5,
    }  # fmt: skip
    assert obs.status(110.0)["last_sample_age_s"] == 11.0
    obs.scrape_error = "http://h:1/m: HTTP 404"
    obs.over_limit, obs.sustain = {"rss": 2}, 3
    obs.limit_exceeded = {"metric": "rss"}
    shown = obs.status(110.0)
    assert shown["over_limit"] == {"rss": 2} and shown["sustain"] == 3
    assert shown["scrape_error"].endswith("404") and shown["limit_exceeded"] == {"metric": "rss"}
    obs.run_ended()  # what belonged to the run goes; the finding and go_env stay
    assert obs.status(120.0) == {
        "go_env": {"GOMEMLIMIT": "460MiB"}, "limit_exceeded": {"metric": "rss"},
    }  # fmt: skip
    assert obs.samples == 1


# -- the process tree -------------------------------------------------------------------


def test_process_tree_sums_descendants_and_survives_one_vanishing() -> None:
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        wait_for(lambda: len(psutil.Process(parent.pid).children()) == 2, 10, "two children")
        tree = sampling.ProcessTree(parent.pid)
        tree.refresh(sampling.children_map())
        assert len(tree.procs) == 3
        first = tree.sample(sockets=True)
        assert first is not None
        assert first["threads"] == 3 and first["rss_bytes"] > 0 and first["open_fds"] >= 9
        assert first["connections"] == 0
        child = psutil.Process(parent.pid).children()[0]
        child.kill()
        wait_for(lambda: not psutil.pid_exists(child.pid), 10, "sh to reap the child")
        second = tree.sample(sockets=False)
        assert second is not None and second["threads"] == 2 and "connections" not in second
    finally:
        for p in psutil.Process(parent.pid).children():
            p.kill()
        parent.kill()
        parent.wait()
    assert tree.sample(sockets=False) is None  # the main process is gone


def test_sockets_are_counted_from_the_fd_links() -> None:
    tree = sampling.ProcessTree(psutil.Process().pid)
    before = tree.sample(sockets=True)
    with socket.socket(), socket.socket():
        after = tree.sample(sockets=True)
    assert before is not None and after is not None
    assert after["connections"] - before["connections"] == 2
    assert after["open_fds"] - before["open_fds"] == 2


# -- the sampler service with real Go programs, in this process -------------------------


def goapp_program(goapp: Path, *args: str, limits: str = "", extra: str = "") -> str:
    argv = ", ".join(json.dumps(a) for a in (str(goapp), *args))
    text = f'[programs.app]\ncommand = [{argv}]\nstart_seconds = "200ms"\n{extra}\n'
    # A leak restart of a run shorter than reset_after is a failed run (it backs
    # off: a limit below the idle baseline must end in FATAL). These programs
    # leak for several samples first, so with a short reset_after their leak
    # restart is the plain, no-backoff kind these tests are about.
    text += '[programs.app.backoff]\nreset_after = "100ms"\n'
    if limits:
        text += "[programs.app.limits]\n" + textwrap.dedent(limits)
    return text


class Harness:
    """A Supervisor's programs and the sampler service, without the rest of gosup."""

    def __init__(self, sup: Supervisor, sampler: resources.ResourceSampler, dumps: Dumps) -> None:
        self.sup, self.sampler, self.dumps = sup, sampler, dumps

    @property
    def app(self) -> Program:
        return self.sup.programs["app"]

    def history(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = self.sup.history.path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if event is None or r["event"] == event]

    async def until(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := cond()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.02)
        return value


@contextlib.asynccontextmanager
async def sampled(tmp_path: Path, programs: str) -> AsyncIterator[Harness]:
    config = configmod.loads(
        f'[supervisor]\nstate_dir = "state"\n{programs}', tmp_path / "app.toml"
    )
    sup = Supervisor(config)
    # as service/app.py wires them
    dumps = Dumps(sup.history, config.supervisor.state_dir / "dumps")
    sampler = resources.ResourceSampler(lambda: sup.programs, LeakResponse(sup.history, dumps))
    sup.state_listeners.append(sampler.on_state)
    sup.ctx.env_providers = (goenv.GoEnv(lambda: sup.programs),)
    await sampler.start()
    try:
        for spec in config.programs:
            program = Program(spec, sup.ctx)
            program.state_listeners.extend(sup.state_listeners)
            sup.programs[spec.name] = program
            program.launch()
            program.post(Start())
        yield Harness(sup, sampler, dumps)
    finally:
        for program in sup.programs.values():
            with contextlib.suppress(CommandError):
                await program.request(Stop(reason="test", join=True))
        await sampler.close()
        for program in sup.programs.values():
            await program.close()
        sup.history.close()


def seen(h: Harness) -> Observations:
    return h.app.observations


def text_of(path: str | Path) -> str:
    return Path(path).read_text()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def assert_leak_restart(h: Harness, metric: str) -> dict[str, Any]:
    """One limit_exceeded for ``metric``, then a leak restart that is no crash."""
    exceeded = h.history("limit_exceeded")
    assert [r["metric"] for r in exceeded] == [metric]
    rec = exceeded[0]
    assert rec["value"] > rec["limit"] and rec["samples"] == 3 and len(rec["values"]) == 3
    assert [r["reason"] for r in h.history("restart_requested")] == ["leak"]
    stopping = h.history("stopping")
    assert stopping[0]["reason"] == "restart (leak)" and stopping[0]["pid"] == rec["pid"]
    assert not h.history("backoff") and not h.history("fatal")
    assert all("crash" not in r for r in h.history("exited"))
    assert h.app.restarts == {"leak": 1} and h.app.failures == 0
    fired = h.app.observations.limit_exceeded
    assert fired is not None and fired["metric"] == metric
    return rec


LEAK_LIMITS = """\
interval = "200ms"
sustain = 3
evidence = "none"
"""


async def leak_restarted(h: Harness, timeout: float = 30.0) -> int:
    """Wait for the leak restart; return the new pid."""
    first = await h.until(lambda: h.app.pid, 20, "the first start")
    await h.until(lambda: h.history("restart_requested"), timeout, "a leak restart")
    return int(await h.until(lambda: h.app.pid not in (None, first) and h.app.pid, 20, "new pid"))


@pytest.mark.parametrize(
    "path", ["/metrics", "/debug/vars", "/debug/pprof/goroutine?debug=1"],
    ids=["prometheus", "expvar", "pprof"],
)  # fmt: skip
def test_goroutine_leak_restarts_with_each_metrics_format(
    tmp_path: Path, goapp: Path, path: str
) -> None:
    port = free_port()
    limits = LEAK_LIMITS + f'goroutines = 250\ngo_metrics = "http://127.0.0.1:{port}{path}"\n'
    prog = goapp_program(
        goapp, "-http", f"127.0.0.1:{port}", "-leak-goroutines", "200", limits=limits
    )

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await h.until(lambda: seen(h).figures.get("goroutines"), 20, "goroutines sampled")
            new_pid = await leak_restarted(h)
            rec = assert_leak_restart(h, "goroutines")
            assert rec["pid"] != new_pid
            # the counts start afresh for the new process (its first sample
            # may come before its first scrape: wait for the figure itself)
            await h.until(lambda: seen(h).figures.get("goroutines"), 20, "a goroutine count")
            assert seen(h).figures["goroutines"] < 250 and not seen(h).over_limit

    run(main())


@pytest.mark.parametrize(
    ("metric", "args", "limit"),
    [
        ("rss", ("-leak-heap", "16000000"), "rss = '48MiB'"),
        ("open_fds", ("-leak-fds", "40"), "open_fds = 60"),
        ("threads", ("-leak-threads", "10"), "threads = 30"),
        ("connections", ("-leak-conns", "15"), "connections = 40"),
        ("heap_inuse", ("-leak-heap", "8000000"), "heap_inuse = '24MiB'"),
    ],
)
def test_each_limit_fires(
    tmp_path: Path, goapp: Path, metric: str, args: tuple[str, ...], limit: str
) -> None:
    port = free_port()
    limits = LEAK_LIMITS + limit + "\n"
    if metric == "heap_inuse":
        limits += f'go_metrics = "http://127.0.0.1:{port}/debug/vars"\n'
    prog = goapp_program(goapp, "-http", f"127.0.0.1:{port}", *args, limits=limits)

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await leak_restarted(h)
            assert_leak_restart(h, metric)

    run(main())


@pytest.mark.parametrize(
    ("args", "limit"),
    [
        (("-spike-goroutines", "3000"), "goroutines = 1000"),
        (("-spike-heap", "64000000"), "heap_inuse = '32MiB'"),
    ],
    ids=["goroutines", "heap_inuse"],
)
def test_a_brief_spike_never_restarts(
    tmp_path: Path, goapp: Path, args: tuple[str, ...], limit: str
) -> None:
    port = free_port()
    limits = f'interval = "150ms"\nsustain = 8\n{limit}\ngo_metrics = "http://127.0.0.1:{port}/metrics"\n'
    prog = goapp_program(
        goapp, "-http", f"127.0.0.1:{port}", *args, "-spike-after", "1s", "-spike-for", "500ms",
        limits=limits,
    )  # fmt: skip

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            # The sampler saw the spike (one sample over the limit, at least) ...
            await h.until(lambda: seen(h).over_limit, 20, "the spike to be seen")
            # ... and it ended without a restart.
            await h.until(lambda: not seen(h).over_limit, 20, "the spike to end")
            # ... and five more samples change nothing (no breach was pending).
            start = seen(h).samples
            await h.until(lambda: seen(h).samples >= start + 5, 20, "five more samples")
            assert not h.history("limit_exceeded") and h.app.restarts == {}
            assert len(h.history("started")) == 1

    run(main())


def goroutine_leak(goapp: Path) -> str:
    """goapp leaking 200 goroutines a second past a limit of 250, pprof evidence on."""
    port = free_port()
    limits = (
        'interval = "200ms"\nsustain = 3\ngoroutines = 250\nevidence = "pprof"\n'
        f'go_metrics = "http://127.0.0.1:{port}/metrics"\n'
    )
    return goapp_program(
        goapp, "-http", f"127.0.0.1:{port}", "-leak-goroutines", "200", limits=limits
    )


def test_pprof_evidence_is_saved_before_the_restart(tmp_path: Path, goapp: Path) -> None:
    prog = goroutine_leak(goapp)

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await leak_restarted(h)
            assert_leak_restart(h, "goroutines")
            events = [r["event"] for r in h.history()]
            i = events.index("limit_exceeded")
            assert events[i : i + 4] == [
                "limit_exceeded", "evidence_saved", "evidence_saved", "restart_requested",
            ]  # fmt: skip
            saved = {r["kind"]: Path(r["path"]) for r in h.history("evidence_saved")}
            assert saved.keys() == {"pprof", "pprof_heap"}
            assert saved["pprof"].parent == tmp_path / "state" / "dumps"
            dump = saved["pprof"].read_text()
            assert dump.startswith("goroutine ") and "main.startLeaks" in dump
            assert dump.count("\ngoroutine ") >= 250
            assert saved["pprof_heap"].read_bytes()[:2] == b"\x1f\x8b"  # a gzipped profile

    run(main())


def test_sigquit_evidence_is_a_stop_not_a_crash(tmp_path: Path, goapp: Path) -> None:
    limits = 'interval = "200ms"\nsustain = 3\nopen_fds = 60\nevidence = "sigquit"\n'
    prog = goapp_program(goapp, "-leak-fds", "40", limits=limits)

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await leak_restarted(h)
            assert_leak_restart(h, "open_fds")
            events = [r["event"] for r in h.history()]
            i = events.index("limit_exceeded")
            assert events[i:i + 7] == [
                "limit_exceeded", "restart_requested", "stopping", "exited", "stopped",
                "evidence_saved", "started",
            ]  # fmt: skip
            exited = h.history("exited")[0]
            assert exited["exit_code"] == 2  # how the Go runtime exits after SIGQUIT
            saved = h.history("evidence_saved")[0]
            assert saved["kind"] == "sigquit"
            dump = text_of(saved["path"])
            assert dump.startswith("SIGQUIT: quit") and "main.main()" in dump
            assert "start: name=" not in dump  # the new process's output is not in it

    run(main())


def test_a_runs_stderr_tap_and_exit_future(tmp_path: Path) -> None:
    """The narrow Program API the SIGQUIT capture uses: a tap sees the current
    run's stderr only, and the exit future says how gosup stopped that run."""
    prog = (
        '[programs.app]\ncommand = ["sh", "-c", "echo run >&2; exec sleep 60"]\n'
        'start_seconds = "100ms"\nstop_signal = "USR1"\n'
    )

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            pid = await h.until(lambda: h.app.state.value == "RUNNING" and h.app.pid, 20, "run")
            assert h.app.exited(pid + 1_000_000).result() is None  # not this run: over already
            taps: list[bytes] = []
            untap = h.app.tap_stderr(taps.append)
            ended = h.app.exited(pid)
            assert not ended.done()
            await h.app.request(Restart(reason="operator"))
            assert ended.done() and ended.result() == signal.SIGUSR1
            log = tmp_path / "logs" / "app.stderr.log"
            await h.until(lambda: log.read_text().count("run") == 2, 20, "the second run")
            assert taps == []  # the first run wrote before the tap, the second after it ended
            untap()  # harmless once the run is over

    run(main())


@pytest.mark.parametrize("problem", ["refused", "garbage", "timeout"])
def test_a_failed_scrape_is_shown_never_a_reason_to_kill(
    tmp_path: Path, goapp: Path, problem: str
) -> None:
    port = free_port()
    with socket.socket() as silent:
        if problem == "refused":
            url, expected = f"http://127.0.0.1:{free_port()}/metrics", "127.0.0.1"
        elif problem == "garbage":
            url, expected = f"http://127.0.0.1:{port}/healthz", "no go_goroutines"
        else:  # accepted by the kernel, never answered
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            url, expected = f"http://127.0.0.1:{silent.getsockname()[1]}/", "no answer within"
        limits = f'interval = "200ms"\nsustain = 2\ngoroutines = 1\ngo_metrics = "{url}"\n'
        prog = goapp_program(goapp, "-http", f"127.0.0.1:{port}", limits=limits)

        async def main() -> None:
            async with sampled(tmp_path, prog) as h:
                error = await h.until(lambda: seen(h).scrape_error, 30, "the error")
                assert expected in error
                pid = h.app.pid
                # Limit: 1 goroutine, so any successful scrape would fire. Ten failed
                # scrapes later, nothing has.
                start = seen(h).samples
                await h.until(lambda: seen(h).samples >= start + 10, 30, "ten samples")
                assert h.app.pid == pid and not h.history("limit_exceeded")
                assert seen(h).figures["rss_bytes"] > 0 and "goroutines" not in seen(h).figures
                assert h.app.status()["scrape_error"] == seen(h).scrape_error

        run(main())


def test_programs_without_limits_are_sampled_for_status(
    tmp_path: Path, goapp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resources, "DEFAULT_INTERVAL", 0.2)

    async def main() -> None:
        async with sampled(tmp_path, goapp_program(goapp)) as h:
            status = await h.until(
                lambda: h.app.status().get("rss_bytes") and h.app.status(), 20, "figures"
            )
            assert status["threads"] >= 1 and status["open_fds"] >= 3
            assert status["last_sample_age_s"] < 10
            assert "connections" not in status and "goroutines" not in status
            await h.app.request(Stop())
            await h.until(lambda: "rss_bytes" not in h.app.status(), 20, "figures cleared")
            assert "last_sample_age_s" not in h.app.status()

    run(main())


def test_go_env_is_set_logged_and_shown(tmp_path: Path, goapp: Path) -> None:
    env_file = tmp_path / "env"
    prog = goapp_program(goapp, "-env-file", str(env_file), limits="rss = '200MiB'\n")

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await h.until(env_file.exists, 20, "the env file")
            expected = goenv.go_env(h.app.spec, goenv.cgroup_limits())
            assert expected["GOMEMLIMIT"] == "180MiB" or expected["GOMEMLIMIT"].endswith("MiB")
            env = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                       if "=" in line and not line.startswith("#"))  # fmt: skip
            assert {k: env.get(k) for k in expected} == expected
            assert h.app.status()["go_env"] == expected

    run(main())


def test_go_env_respects_what_the_program_sets(tmp_path: Path, goapp: Path) -> None:
    env_file = tmp_path / "env"
    prog = goapp_program(
        goapp, "-env-file", str(env_file), limits="rss = '200MiB'\n",
        extra="environment = { GOMEMLIMIT = '77MiB', GOMAXPROCS = '3' }",
    )  # fmt: skip

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await h.until(env_file.exists, 20, "the env file")
            lines = env_file.read_text().splitlines()
            assert "GOMEMLIMIT=77MiB" in lines and "GOMAXPROCS=3" in lines
            assert "go_env" not in h.app.status()

    run(main())


def test_a_restarted_program_is_scraped_over_a_connection_to_its_new_process(
    tmp_path: Path, goapp: Path
) -> None:
    port = free_port()
    limits = f'interval = "200ms"\ngo_metrics = "http://127.0.0.1:{port}/debug/vars"\n'
    prog = goapp_program(goapp, "-http", f"127.0.0.1:{port}", limits=limits)

    def peers(pid: int) -> set[int]:
        """The local ports of gosup's connections to ``pid``'s port."""
        return {
            c.laddr.port
            for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        }

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            first = await h.until(lambda: h.app.state.value == "RUNNING" and h.app.pid, 20, "run")
            await h.until(lambda: seen(h).figures.get("goroutines"), 20, "the Go figures")
            before = await h.until(lambda: peers(first), 20, "the kept-alive connection")
            start = seen(h).samples
            await h.until(lambda: seen(h).samples >= start + 5, 30, "five more samples")
            assert peers(first) == before  # kept alive across samples
            await h.app.request(Restart(reason="operator"))
            second = await h.until(
                lambda: h.app.state.value == "RUNNING" and h.app.pid != first and h.app.pid,
                20, "the second run",
            )  # fmt: skip
            await h.until(lambda: seen(h).figures.get("heap_inuse_bytes"), 20, "its figures")
            after = await h.until(lambda: peers(second), 20, "a connection to the new run")
            assert after.isdisjoint(before) and seen(h).scrape_error is None

    run(main())


def test_dump_on_request_keeps_the_program_running(tmp_path: Path, goapp: Path) -> None:
    port = free_port()
    limits = f'go_metrics = "http://127.0.0.1:{port}/metrics"\n'
    prog = goapp_program(goapp, "-http", f"127.0.0.1:{port}", limits=limits)
    prog += goapp_program(goapp).replace("programs.app", "programs.plain")

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            pid = await h.until(lambda: h.app.state.value == "RUNNING" and h.app.pid, 20, "app")
            await h.until(lambda: seen(h).figures.get("goroutines"), 20, "the HTTP server")
            data = await h.dumps.on_request(h.app)
            text = text_of(data["path"])
            assert text.startswith("goroutine ") and "main.main()" in text
            assert h.app.pid == pid and h.app.restarts == {}
            saved = h.history("evidence_saved")[-1]
            assert saved["path"] == data["path"] and saved["reason"] == "operator"
            with pytest.raises(RequestError, match="plain has no go_metrics URL"):
                await h.dumps.on_request(h.sup.programs["plain"])
            await h.app.request(Stop())
            with pytest.raises(RequestError, match="app is not running"):
                await h.dumps.on_request(h.app)

    run(main())


# -- end to end: a real `gosup run` ------------------------------------------------------


def test_gosup_restarts_a_leaking_program_with_a_dump_and_spares_a_spiking_one(
    gosup_factory: Any, goapp: Path
) -> None:
    leak_port, spike_port, over_port = free_port(), free_port(), free_port()
    text = (
        goapp_program(
            goapp, "-http", f"127.0.0.1:{leak_port}", "-leak-goroutines", "300",
            limits=f'interval = "250ms"\nsustain = 3\ngoroutines = 500\n'
            f'go_metrics = "http://127.0.0.1:{leak_port}/metrics"\n',
        ).replace("programs.app", "programs.leaky")
        + goapp_program(
            goapp, "-http", f"127.0.0.1:{spike_port}", "-spike-goroutines", "3000",
            "-spike-after", "500ms", "-spike-for", "400ms",
            limits=f'interval = "250ms"\nsustain = 6\ngoroutines = 500\n'
            f'go_metrics = "http://127.0.0.1:{spike_port}/debug/vars"\n',
        ).replace("programs.app", "programs.spiky")
        # always over its fd limit, never for long enough; its metrics URL is a 404
        + goapp_program(
            goapp, "-http", f"127.0.0.1:{over_port}",
            limits=f'interval = "250ms"\nsustain = 1000\nopen_fds = 1\n'
            f'go_metrics = "http://127.0.0.1:{over_port}/nope"\n',
        ).replace("programs.app", "programs.over")
    )  # fmt: skip
    g = gosup_factory(text).start()
    exceeded = g.wait_event("limit_exceeded", "leaky", timeout=40)[0]
    saved = g.wait_event("evidence_saved", "leaky", timeout=20)[0]
    g.wait_event("restart_requested", "leaky", timeout=20)
    g.wait_event("running", "leaky", count=2, timeout=30)
    assert exceeded["metric"] == "goroutines" and saved["kind"] == "pprof"
    assert "main.startLeaks" in Path(saved["path"]).read_text()
    assert Path(saved["path"]).parent == g.state_dir / "dumps"
    assert [r["reason"] for r in g.history("leaky", "restart_requested")] == ["leak"]
    assert not g.history("leaky", "backoff")
    wait_for(lambda: "spike: end" in (g.log_dir / "spiky.stdout.log").read_text(), 30, "the spike")

    def status() -> dict[str, dict[str, Any]] | None:
        programs = json.loads(g.cli("status", "--json").stdout)["programs"]
        by_name = {p["name"]: p for p in programs}
        return by_name if by_name["leaky"]["goroutines"] is not None else None

    programs = wait_for(status, 20, "the new leaky process's figures")
    assert programs["spiky"]["restarts"] == 0 and not g.history("spiky", "limit_exceeded")
    leaky = programs["leaky"]
    assert leaky["limit_exceeded"]["metric"] == "goroutines" and leaky["rss_bytes"] > 0

    # The status table points out the limit that fired, the run building up and
    # the failed scrape.
    def table() -> dict[str, str] | None:
        lines = g.cli("status").stdout.splitlines()
        rows = {line.split()[0]: line for line in lines[1:]}
        return rows if "over open_fds" in rows["over"] and "/1000" in rows["over"] else None

    rows = wait_for(table, 20, "the over-limit note")
    assert "leak: goroutines" in rows["leaky"]
    assert rows["over"].endswith("/1000; scrape: HTTP 404"), rows["over"]
    dump = g.cli("dump", "spiky")
    assert dump.returncode == 0, dump.stderr
    assert Path(dump.stdout.strip()).read_text().startswith("goroutine ")
    unknown = g.cli("dump", "nope")
    assert unknown.returncode != 0 and "unknown program 'nope'" in unknown.stderr
    assert g.stop() == 0
