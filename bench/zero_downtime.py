"""Zero-downtime restarts (issue 14): requests at a fixed rate while the
supervisor restarts the Go HTTP fixture, per restart kind.

A Go load generator (bench/loadgen, stdlib only, built once into
bench/.cache/bin like goapp, in a process of its own) sends GET / at a fixed
rate to goapp, open loop: each request is sent when it is due, whatever
happened to the ones before it. Half go on a new connection per request,
half on keep-alive connections from a pool. A keep-alive request whose
reused connection was closed by the server is retried once on a new
connection, as HTTP clients do for idempotent requests (Go's Transport,
urllib3): it counts as ``ka_retried``, not as failed. Latency is taken from
the moment the request was due, so a stalled generator or server shows as
latency, not as fewer requests. Meanwhile the
supervisor restarts goapp, ``--restarts`` times per kind:

- operator: the supervisor's restart command;
- leak: goapp leaks heap (a marker file makes the next start add
  ``-leak-heap``) until the supervisor's memory limit restarts it;
- config: a new version of a config file with ``on_change = "restart"``
  (``gosup stage``);
- crash: SIGKILL to the child.

Every request under way (from when it was due to its answer or failure) at
some time between a restart's trigger and 0.5 s after the new child runs
counts for that kind; the p99 of the requests outside every restart is
the baseline, and the added p99 is a kind's p99 minus it. Side by side:
gosup with ``sockets`` + ``restart_mode = "overlap"``, gosup without,
supervisord, PM2, circus with its own shared socket (``use_sockets``). A
kind a supervisor has no built-in way to make is a row with the reason.

The previous instrument, an asyncio generator in a Python process, is kept
only as the fallback when the Go generator cannot be built (the rows' note
says so): its own p99 with no restart at all was 24-166 ms on a loaded
2-core machine, more than the 50 ms it is meant to judge.
``--compare-instruments`` runs both, alternately in the same minute, against
an idle goapp with no supervisor and no restart, and prints their latency.

    python bench/zero_downtime.py [--quick] [--rate 1000] [--restarts 20]
    python bench/zero_downtime.py --compare-instruments [--rate 1000]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import drivers
from drivers import circus as circus_driver
from drivers import gosup as gosup_driver

NAME = "zero_downtime"
KINDS = ("operator", "leak", "config", "crash")
PLANNED = ("operator", "leak", "config")
LEAK_PER_S = 40_000_000  # bytes/s once the marker is there
LEAK_LIMIT = "120MiB"
SETTLE_S = 0.5  # requests due this long after the new child runs still count for the restart
# A child is seen (in the supervisor's process tree) a few ms before the
# supervisor dates its start: 1.0 s after it was seen, a run could still be
# 0.999 s old for gosup, a failed run under reset_after = "1s", backed off 0.25 s.
RUN_AGE_S = 1.3
TIMEOUT_S = 5.0  # a request without an answer by then is a failure ("timeout")
POOL = 32  # keep-alive connections at most
# Each supervisor's restarts stop when this is spent (the rest of its kinds are
# counted as far as they got, and the row says so), so a full run is bounded:
# 5 supervisors x 10 min at most, about 20 min in all when nothing stalls.
BUDGET_S = 600.0
QUICK_BUDGET_S = 120.0
# sh picks the leak flag by a marker file and execs goapp (same pid: LISTEN_PID
# still names it, and every supervisor sees goapp as its child).
WRAPPER = f'if [ -e leak ]; then set -- "$@" -leak-heap {LEAK_PER_S}; fi; exec "$0" "$@"'
# circus passes its socket's fd number as an argument: move it to fd 3 and set
# systemd's variables, so goapp takes it exactly as it takes gosup's.
CIRCUS_WRAPPER = 'fd=$1; shift; eval "exec 3<&$fd"; export LISTEN_FDS=1 LISTEN_PID=$$; ' + WRAPPER
UNSUPPORTED = {
    "leak": "no memory-limit restart built in (superlance memmon, circus' resource_watcher"
    " plugin and pm2's max_memory_restart poll are add-ons or 30 s polls; not configured)",
    "config": "no restart on a staged config file (the operator row is the equivalent)",
}


# -- the load generators ---------------------------------------------------------------


@dataclass
class Sample:
    due: float  # time.monotonic() when the request was due
    latency: float  # seconds from due to the answer (or the failure)
    mode: str  # "new" | "keepalive"
    outcome: str  # ok | refused | reset | closed | timeout | http NNN | error name


class LoadProcess:
    """The Python fallback: an asyncio generator in a child process (its own
    GIL and event loop); the samples come back when it stops. time.monotonic() is the system's
    CLOCK_MONOTONIC, the same in both processes, so its due times line up
    with the restart windows taken here."""

    def __init__(self, port: int, rate: float) -> None:
        self.port, self.rate = port, rate
        self.samples: list[Sample] = []
        self.retried: list[float] = []
        self.started = self.stopped = 0.0
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_generate, args=(port, rate, self._stop, child_conn), daemon=True
        )
        self.instrument = "Python asyncio generator"

    def start(self) -> None:
        self._proc.start()
        if not self._conn.poll(30):
            raise common.BenchError("the load generator did not start within 30 s")
        self.started = self._conn.recv()

    def stop(self) -> None:
        self._stop.set()
        if self._conn.poll(
            TIMEOUT_S + 30
        ):  # plain data: classes of a spawned __main__ do not pickle back
            samples, self.retried, self.started, self.stopped = self._conn.recv()
            self.samples = [Sample(*fields) for fields in samples]
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


class GoLoad:
    """The Go generator (bench/loadgen) as a child process: it prints its start
    time, sends until its stdin closes, then writes one JSON line per request
    ([due, latency, mode, outcome, retried, lag]) to a file read here; lag is
    how late the generator itself started the request (part of its latency).
    Its times are CLOCK_MONOTONIC, time.monotonic() here, so they line up with
    the restart windows taken here."""

    instrument = "Go loadgen"

    def __init__(self, binary: Path, port: int, rate: float) -> None:
        self.binary, self.port, self.rate = binary, port, rate
        self.samples: list[Sample] = []
        self.retried: list[float] = []
        self.lags: list[float] = []  # seconds, one per sample
        self.started = self.stopped = 0.0
        self._tag = common.new_tag()
        fd, name = tempfile.mkstemp(prefix="gosup-bench-loadgen-", suffix=".jsonl")
        os.close(fd)
        self._out = Path(name)
        self._lines: queue.Queue[str] = queue.Queue()
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        argv = [str(self.binary), "-addr", f"127.0.0.1:{self.port}", "-rate", f"{self.rate:g}"]
        argv += ["-timeout", f"{TIMEOUT_S:g}s", "-pool", str(POOL), "-out", str(self._out)]
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=common.bench_env(self._tag),
        )
        out = self._proc.stdout
        assert out is not None
        threading.Thread(target=self._read, args=(out,), daemon=True).start()
        try:
            self.started = float(self._line(30)["started"])
        except BaseException:
            self._end()
            raise

    def _read(self, out: Any) -> None:
        for line in out:
            self._lines.put(line)

    def _line(self, timeout: float) -> dict[str, Any]:
        try:
            return dict(json.loads(self._lines.get(timeout=timeout)))
        except queue.Empty:
            msg = f"the Go load generator said nothing for {timeout:g} s"
            raise common.BenchError(msg) from None

    def stop(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        try:
            proc.stdin.close()  # stop sending; it waits for the requests under way
            self.stopped = float(self._line(TIMEOUT_S + 30)["stopped"])
            proc.wait(10)
            with self._out.open() as f:
                for line in f:
                    due, latency, mode, outcome, retried, lag = json.loads(line)
                    self.samples.append(Sample(due, latency, mode, outcome))
                    self.lags.append(lag)
                    if retried:
                        self.retried.append(due)
        finally:
            self._end()

    def _end(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        common.sweep(self._tag)
        self._out.unlink(missing_ok=True)


def load_generator(port: int, rate: float) -> GoLoad | LoadProcess:
    """The Go generator; the Python one only when Go cannot build it (its
    ``instrument`` says so, and every row's note with it)."""
    try:
        return GoLoad(common.loadgen(), port, rate)
    except common.BenchError as exc:
        common.log(f"the Go load generator cannot be built, using the Python one: {exc}")
        load = LoadProcess(port, rate)
        load.instrument = "Python asyncio generator (Go loadgen build failed)"
        return load


def _generate(port: int, rate: float, stop: Any, conn: Any) -> None:
    load = Load(port, rate, stop=stop)
    asyncio.run(load.run(lambda: conn.send(load.started)))
    samples = [(x.due, x.latency, x.mode, x.outcome) for x in load.samples]
    conn.send((samples, load.retried, load.started, load.stopped))


@dataclass
class Load:
    port: int
    rate: float
    samples: list[Sample] = field(default_factory=list)
    retried: list[float] = field(default_factory=list)  # due times of keep-alive retries
    started: float = 0.0
    stopped: float = 0.0
    stop: Any = None  # a multiprocessing Event: set = stop sending

    REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"

    async def run(self, started: Any) -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(  # the Event is a blocking wait: a thread hands it over
            target=lambda: (self.stop.wait(), loop.call_soon_threadsafe(stopping.set)),
            daemon=True,
        ).start()
        await self._main(stopping, started)

    async def _main(self, stopping: asyncio.Event, started: Any) -> None:
        pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        tasks: set[asyncio.Task[None]] = set()
        self.started = time.monotonic()
        started()
        n = 0
        while not stopping.is_set():
            due = self.started + n / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            mode = "new" if n % 2 == 0 else "keepalive"
            task = asyncio.create_task(self._one(due, mode, pool))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        self.stopped = time.monotonic()
        if tasks:
            await asyncio.wait(tasks, timeout=TIMEOUT_S + 1)
        for _, w in pool:
            w.close()

    async def _one(self, due: float, mode: str, pool: list[Any]) -> None:
        outcome = await self._attempt(mode, pool, due)
        self.samples.append(Sample(due, time.monotonic() - due, mode, outcome))

    async def _attempt(self, mode: str, pool: list[Any], due: float) -> str:
        reused = mode == "keepalive" and bool(pool)
        conn = pool.pop() if reused else None
        try:
            async with asyncio.timeout(TIMEOUT_S):
                try:
                    return await self._exchange(conn, mode, pool)
                except (ConnectionResetError, asyncio.IncompleteReadError, BrokenPipeError):
                    if not reused:
                        raise
                    # the server closed an idle keep-alive connection as we used it:
                    # retry once on a new connection, as HTTP clients do
                    self.retried.append(due)
                    return await self._exchange(None, mode, pool)
        except ConnectionRefusedError:
            return "refused"
        except ConnectionResetError:
            return "reset"
        except (asyncio.IncompleteReadError, BrokenPipeError):
            return "closed"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return type(exc).__name__

    async def _exchange(self, conn: Any, mode: str, pool: list[Any]) -> str:
        if conn is None:
            conn = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        keep = False
        try:
            writer.write(self.REQUEST)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            await reader.readexactly(int(headers.get("content-length", "0")))
            keep = mode == "keepalive" and headers.get("connection", "").lower() != "close"
            return "ok" if status == 200 else f"http {status}"
        finally:
            if keep and len(pool) < POOL:
                pool.append(conn)
            else:
                writer.close()


# -- supervisors ----------------------------------------------------------------------------


def goapp_argv(goapp: Path, port: int | None) -> tuple[str, ...]:
    http = ("-http", f"127.0.0.1:{port}") if port is not None else ()
    return ("/bin/sh", "-c", WRAPPER, str(goapp), "-name", "web", *http, "-shutdown-timeout", "5s")


class GosupZD(gosup_driver.GosupDriver):
    """gosup with a memory limit and a config file that restarts; optionally sockets + overlap."""

    def __init__(self, wd: Path, progs: list[drivers.Program], port: int, overlap: bool):
        super().__init__(wd, progs, drivers.Settings())
        self.port, self.overlap = port, overlap
        (wd / "web.conf").write_text("version 0\n")

    def _program(self, name: str, argv: tuple[str, ...]) -> list[str]:
        lines = super()._program(name, argv)
        head = ['start_seconds = "300ms"']
        if self.overlap:
            head += [f'sockets = ["tcp://127.0.0.1:{self.port}"]', 'restart_mode = "overlap"']
        lines[1:1] = head
        lines += ["", f"[programs.{name}.backoff]", 'reset_after = "1s"']
        lines += ["", f"[programs.{name}.limits]", 'interval = "250ms"', "sustain = 2"]
        lines += [f'rss = "{LEAK_LIMIT}"', 'evidence = "none"']
        lines += ["", f"[[programs.{name}.config_files]]", 'path = "web.conf"']
        lines += ['on_change = "restart"', 'probation = "1s"']
        return lines


class CircusZD(circus_driver.CircusDriver):
    """circus holding the socket itself ([socket:web], use_sockets)."""

    def __init__(self, wd: Path, progs: list[drivers.Program], port: int):
        super().__init__(wd, progs, drivers.Settings(fast_restart=True))
        self.port = port

    def write_config(self) -> None:
        super().write_config()
        path = self.dir / "circus.ini"
        text = path.read_text()
        text += f"\n[socket:web]\nhost = 127.0.0.1\nport = {self.port}\n"
        path.write_text(text)

    def _watcher(self, name: str, argv: tuple[str, ...]) -> list[str]:
        lines = super()._watcher(name, argv)
        lines.append("use_sockets = True")
        return lines


def make(label: str, wd: Path, goapp: Path, port: int) -> drivers.Driver:
    if label == "gosup-overlap":
        return GosupZD(wd, [drivers.Program("web", goapp_argv(goapp, None))], port, True)
    if label == "gosup":
        return GosupZD(wd, [drivers.Program("web", goapp_argv(goapp, port))], port, False)
    if label == "circus":
        argv = ("/bin/bash", "-c", CIRCUS_WRAPPER, str(goapp), "$(circus.sockets.web)")
        argv += ("-name", "web", "-shutdown-timeout", "5s")
        return CircusZD(wd, [drivers.Program("web", argv)], port)
    prog = drivers.Program("web", goapp_argv(goapp, port))
    return drivers.make(label, wd, [prog], drivers.Settings(fast_restart=True))


def supported(label: str, kind: str) -> str | None:
    """None when ``label`` can make a ``kind`` restart, else the reason it cannot."""
    if label.startswith("gosup") or kind not in UNSUPPORTED:
        return None
    return UNSUPPORTED[kind]


def ctl(d: drivers.Driver, *args: str) -> None:
    cmd = d.ctl_command()  # type: ignore[attr-defined]
    run = subprocess.run(
        [*cmd, *args], cwd=d.dir, env=d.env(), capture_output=True, text=True, timeout=120
    )
    if run.returncode != 0:
        raise common.BenchError(f"{' '.join(args)}: exit {run.returncode}: {run.stderr[-500:]}")


def child(d: drivers.Driver) -> int | None:
    return d.child_pids().get("web")


def wait_replaced(d: drivers.Driver, old: int, timeout: float = 60.0) -> int:
    """Wait until ``old`` is gone and another goapp runs; its pid."""

    def replaced() -> int | None:
        d.assert_alive()
        pid = child(d)
        return pid if pid is not None and pid != old and not drivers.pid_alive(old) else None

    return common.wait_for(replaced, timeout, f"{d.name}: pid {old} replaced", poll=0.02)


def restart(d: drivers.Driver, label: str, kind: str, n: int) -> tuple[float, float]:
    """One restart of ``kind``; (trigger, done) in time.monotonic()."""
    old = child(d)
    assert old is not None
    if kind == "leak":
        # off the clock: a restart that starts a leaking goapp, then the marker goes
        marker = d.dir / "leak"
        marker.touch()
        ctl(d, "restart", "web")
        leaking = wait_replaced(d, old)
        marker.unlink()
        time.sleep(SETTLE_S + 0.2)
        t0 = time.monotonic()  # the leak is under way; the supervisor acts on its own
        return t0, _done(wait_replaced(d, leaking, timeout=120))
    t0 = time.monotonic()
    if kind == "operator":
        ctl(d, "restart", "web")
    elif kind == "crash":
        os.kill(old, signal.SIGKILL)
    elif kind == "config":
        new = d.dir / f"web.conf.{n}"
        new.write_text(f"version {n + 1}\n")
        ctl(d, "stage", "--no-wait", str(new), "web.conf")
    return t0, _done(wait_replaced(d, old))


def _done(_pid: int) -> float:
    return time.monotonic()


def wait_serving(port: int, timeout: float) -> None:
    def up() -> bool | None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        return None

    common.wait_for(up, timeout, f"127.0.0.1:{port} accepting")


def measure(
    label: str, goapp: Path, restarts: int, rate: float, keep: bool, budget: float = BUDGET_S
) -> dict[str, Any]:
    port = free_port()
    cut_short: list[str] = []
    windows: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    excluded: list[tuple[float, float]] = []  # off-the-clock restarts (the leak's setup)
    with common.workdir(f"zd-{label}", keep=keep) as wd, make(label, wd, goapp, port) as d:
        d.wait_children(1, timeout=60)
        wait_serving(port, 30)
        load = load_generator(port, rate)
        load.start()
        until = time.monotonic() + budget
        try:
            time.sleep(2.0)  # baseline
            for kind in KINDS:
                if supported(label, kind):
                    continue
                for n in range(restarts):
                    if time.monotonic() > until:
                        cut_short.append(f"{kind}: {n} of {restarts} (budget {budget:g}s spent)")
                        break
                    common.log(f"{label}: {kind} restart {n + 1}/{restarts}")
                    begin = time.monotonic()
                    t0, t1 = restart(d, label, kind, n)
                    if t0 > begin:
                        excluded.append((begin, t0))
                    windows[kind].append((t0, t1 + SETTLE_S))
                    # The next kill comes RUN_AGE_S after the new child was seen:
                    # past every supervisor's healthy-run window (gosup's
                    # reset_after 1s) with a margin, so a crash restarts at once.
                    time.sleep(RUN_AGE_S)
            time.sleep(1.0)
        finally:
            load.stop()
    out = summarise(label, load, windows, excluded)
    if cut_short:
        out["cut_short"] = cut_short
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarise(
    label: str,
    load: GoLoad | LoadProcess,
    windows: dict[str, list[tuple[float, float]]],
    excluded: list[tuple[float, float]],
) -> dict[str, Any]:
    def inside(s: Sample, spans: list[tuple[float, float]]) -> bool:
        # the request was under way (due .. answered) at some time in a span: a
        # request sent just before a SIGKILL and lost with the process counts too
        return any(s.due <= b and s.due + s.latency >= a for a, b in spans)

    every = [w for spans in windows.values() for w in spans] + excluded
    outside = [s for s in load.samples if not inside(s, every)]
    base = [s.latency * 1000 for s in outside]
    base_p99 = common.percentile(base, 99) if base else None
    duration = max(load.stopped - load.started, 1e-9)
    lags = getattr(load, "lags", [])
    out: dict[str, Any] = {
        "instrument": load.instrument,
        "requests": len(load.samples),
        "rate_target": load.rate,
        "rate_reached": round(len(load.samples) / duration, 1),
        "baseline_p99_ms": None if base_p99 is None else round(base_p99, 2),
        # how late the generator itself started its requests (Go loadgen only): the
        # part of every latency that is the instrument's, not the server's
        "generator_lag_p99_ms": round(common.percentile(lags, 99) * 1000, 2) if lags else None,
        "baseline_outcomes": dict(Counter(s.outcome for s in outside)),
        "baseline_failures_at_s": [
            round(s.due - load.started, 2) for s in outside if s.outcome != "ok"
        ][:20],
        "kinds": {},
    }
    for kind in KINDS:
        reason = supported(label, kind)
        if reason:
            out["kinds"][kind] = {"skipped": reason}
            continue
        spans = windows[kind]
        mine = [s for s in load.samples if inside(s, spans)]
        outcomes = Counter(s.outcome for s in mine)
        lat = [s.latency * 1000 for s in mine]
        p99 = common.percentile(lat, 99) if lat else None
        out["kinds"][kind] = {
            "restarts": len(spans),
            "requests": len(mine),
            "failed": sum(n for o, n in outcomes.items() if o != "ok"),
            "refused": outcomes["refused"],
            "conn_errors": sum(outcomes[o] for o in ("reset", "closed")),
            "timeouts": outcomes["timeout"],
            "outcomes": dict(outcomes),
            "ka_retried": sum(1 for t in load.retried if any(a <= t <= b for a, b in spans)),
            "p99_ms": None if p99 is None else round(p99, 2),
            "added_p99_ms": None if p99 is None or base_p99 is None else round(p99 - base_p99, 2),
        }
    return out


def note(res: dict[str, Any]) -> str:
    text = f"{res['rate_reached']:g} req/s reached, base p99 {res['baseline_p99_ms']} ms"
    if res.get("generator_lag_p99_ms") is not None:
        text += f", generator's own lag p99 {res['generator_lag_p99_ms']} ms"
    if res.get("instrument", GoLoad.instrument) != GoLoad.instrument:
        text += f"; measured by the {res['instrument']}"
    return text + "".join(f"; cut short: {c}" for c in res.get("cut_short", []))


# -- the instruments side by side ---------------------------------------------------------


def compare_instruments(goapp: Path, rate: float, seconds: float, rounds: int) -> dict[str, Any]:
    """The generators' own latency: each in turn against one idle goapp (no
    supervisor, no restart), ``rounds`` times, so both see the same machine in
    the same minute. The first second of each run is left out (warm-up)."""
    port, tag = free_port(), common.new_tag()
    argv = [str(goapp), "-name", "web", "-http", f"127.0.0.1:{port}"]
    server = subprocess.Popen(
        argv, env=common.bench_env(tag), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rows: list[list[Any]] = []
    runs: list[dict[str, Any]] = []
    try:
        wait_serving(port, 30)
        makers: dict[str, Callable[[], GoLoad | LoadProcess]] = {
            "Go loadgen": lambda: GoLoad(common.loadgen(), port, rate),
            "Python asyncio generator": lambda: LoadProcess(port, rate),
        }
        for n in range(rounds):
            for name, make_load in makers.items():
                common.log(f"instruments: {name}, round {n + 1}/{rounds}, {seconds:g} s")
                load = make_load()
                load.start()
                time.sleep(seconds)
                load.stop()
                kept = [x for x in load.samples if x.due >= load.started + 1.0]
                lat = [x.latency * 1000 for x in kept]
                failed = sum(1 for x in kept if x.outcome != "ok")
                duration = max(load.stopped - load.started, 1e-9)
                run = {
                    "instrument": name,
                    "round": n + 1,
                    "requests": len(load.samples),
                    "rate_reached": round(len(load.samples) / duration, 1),
                    "failed": failed,
                    **{k: round(v, 2) for k, v in common.describe(lat).items() if k != "n"},
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                }
                own = zip(load.samples, getattr(load, "lags", []), strict=False)
                lags = [g * 1000 for x, g in own if x.due >= load.started + 1.0]
                run["send_lag_p99"] = round(common.percentile(lags, 99), 2) if lags else None
                runs.append(run)
                rows.append([name, n + 1, run["requests"], run["rate_reached"], failed,
                             run.get("p50"), run.get("p99"), run.get("max"),
                             run["send_lag_p99"] or "-", run["loadavg_1m"]])  # fmt: skip
    finally:
        server.kill()
        server.wait()
        common.sweep(tag)
    columns = ["instrument", "round", "requests", "req/s reached", "failed", "p50 ms", "p99 ms",
               "max ms", "own send lag p99 ms", "load avg 1m"]  # fmt: skip
    title = f"Load generators against an idle goapp, no restart, {rate:g} req/s, {seconds:g} s each"
    return {"runs": runs, "table": common.table(title, columns, rows)}


LABELS = ("gosup-overlap", "gosup", "supervisord", "pm2", "circus")


def main() -> int:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    p.add_argument("--restarts", type=int, help="restarts per kind (default 20, --quick 2)")
    p.add_argument(
        "--compare-instruments",
        action="store_true",
        help="only compare the Go and the Python generator against an idle goapp (no restart,"
        " no result file): 2 rounds of 20 s each, alternately",
    )
    args = p.parse_args()
    if args.compare_instruments:
        out = compare_instruments(common.goapp(), args.rate, 20.0, 2)
        common.print_tables([out["table"]])
        return 0
    restarts = args.restarts or (2 if args.quick else 20)
    names = common.selected(args)
    labels = [lb for lb in LABELS if lb.split("-")[0] in names]
    goapp = common.goapp()
    info = drivers.availability(sorted({lb.split("-")[0] for lb in labels}))
    results: dict[str, Any] = {}
    for label in labels:
        sup = label.split("-")[0]
        if not info.get(sup, {}).get("ok"):
            results[label] = {"error": f"not usable: {info.get(sup, {}).get('reason')}"}
            continue
        common.log(f"{label}: {restarts} restarts per kind at {args.rate:g} req/s")
        try:
            budget = QUICK_BUDGET_S if args.quick else BUDGET_S
            results[label] = measure(label, goapp, restarts, args.rate, args.keep, budget)
        except (common.BenchError, OSError, subprocess.SubprocessError) as exc:
            results[label] = {"error": str(exc)[-500:]}
    rows = []
    for label, res in results.items():
        if "error" in res:
            rows.append([label, "-", "-", "-", "-", "-", "-", "-", "-", "-", res["error"]])
            continue
        for kind, k in res["kinds"].items():
            if "skipped" in k:
                rows.append([label, kind, "-", "-", "-", "-", "-", "-", "-", "-", k["skipped"]])
                continue
            rows.append([label, kind, k["restarts"], k["requests"], k["failed"], k["refused"],
                         k["conn_errors"], k["timeouts"], k["ka_retried"], k["added_p99_ms"],
                         note(res)])  # fmt: skip
    columns = ["supervisor", "kind", "restarts", "requests", "failed", "refused", "reset/closed",
               "timeouts", "keep-alive retried", "added p99 ms", "note"]  # fmt: skip
    title = f"Zero-downtime restarts: requests at {args.rate:g}/s through each restart kind"
    tab = common.table(title, columns, rows)
    common.print_tables([tab])
    common.write_result(
        NAME,
        args.quick,
        {
            "params": {
                "rate": args.rate,
                "restarts_per_kind": restarts,
                "settle_s": SETTLE_S,
                "timeout_s": TIMEOUT_S,
                "leak_per_s": LEAK_PER_S,
                "leak_limit": LEAK_LIMIT,
                "budget_s_per_supervisor": QUICK_BUDGET_S if args.quick else BUDGET_S,
            },
            "results": results,
            "tables": [tab],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
