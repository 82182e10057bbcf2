"""Event-loop lag under stress: does gosup's one loop keep its timers while
everything happens at once?

One gosup runs, at the same time:

- N programs that crash-loop (goapp ``-mode exit -code 1``: exit at once;
  backoff 100 ms .. 1 s, never FATAL): N = 200 (``--quick``: 50);
- one program flooding stdout, 1 GB a run, restarted after each run;
- ``status`` asked 10 times a second over the control socket (the request
  ``gosup status`` sends, on a new connection each time; see below);
- a staged config every second (``gosup stage --no-wait``, the real CLI) for
  a program that reloads on SIGHUP (probation 500 ms);
- a healthy program SIGKILLed every few seconds (its restart latency: its
  replacement's own start stamp minus the clock just before the kill).

Measured, on gosup's own metric: the loop's timer lateness,
``gosup_event_loop_lag_seconds`` (DESIGN §8; ``metrics_listen`` on, scraped
at the start and the end of the stress window; the difference of the two
histograms is the window's). Its buckets include 10 ms and 50 ms, so "p99 <=
10 ms" is "99% of the ticks in the <= 10 ms bucket" and "max <= 50 ms" is
"every tick in the <= 50 ms bucket": judged exactly, reported as the bucket
bound. The healthy program's restart latency is measured first on a quiet
gosup (the same program and settings, nothing else running) in the same run.
After gosup stops, the history is checked against what happened: every
process that stamped its start (crash-loopers, flood runs, the healthy
program's runs) has its ``started`` record and an ``exited`` (or
``stopped``) record, and every kill its ``exited``; a missing one is a lost
record.

Beside the lag, what bounds it (load-independent where the lag is not):
the CPU time of gosup's loop thread and of all its threads per crash-loop
start in the window, how long the loop thread waited for a CPU (run queue,
``/proc/PID/task/PID/schedstat``: a share of the window the loop could not
run however little it had to do), the load average at both ends and the
CPU time the hypervisor took from this VM (``steal`` in /proc/stat: the
machine giving less).
``--loop-rt`` is a diagnostic, never the measurement: it gives gosup's loop
thread (only that thread; its children are not affected,
``SCHED_RESET_ON_FORK``) the real-time policy SCHED_RR at priority 1, so the
loop waits for no CPU; what lag remains is gosup's own.

gosup only: no incumbent exports its loop's lateness. The status load talks
to the socket directly instead of starting 10 Python interpreters a second,
which on a 2-core machine would measure CPU starvation of the whole box
rather than gosup's loop (``--status-cli`` uses the real command instead).

    python bench/loop_lag.py [--quick] [--programs N] [--duration S] [--status-cli] [--loop-rt]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import common
import drivers
import profiling
from drivers import gosup as gosup_driver
from sampling import free_ports

NAME = "loop_lag"
FLOOD_BYTES = 1_000_000_000
STATUS_PER_S = 10
STAGE_EVERY = 1.0
METRIC = "gosup_event_loop_lag_seconds"
T_P99, T_MAX = 0.010, 0.050  # seconds
HEALTHY, CONFIGURED, FLOOD = "healthy", "configured", "flood"


class LagDriver(gosup_driver.GosupDriver):
    """gosup with metrics on and each kind of program configured for its role."""

    def __init__(self, wd: Path, progs: list[drivers.Program], port: int) -> None:
        super().__init__(wd, progs, drivers.Settings())
        self.port = port

    def write_config(self) -> None:
        super().write_config()
        path = self.dir / "app.toml"
        text = path.read_text().replace(
            "[supervisor]\n", f'[supervisor]\nmetrics_listen = "127.0.0.1:{self.port}"\n', 1
        )
        path.write_text(text)

    def _program(self, name: str, argv: tuple[str, ...]) -> list[str]:
        lines = super()._program(name, argv)
        if name == HEALTHY:
            # As restart_latency's tuned variant: kills seconds apart restart at once.
            lines.insert(1, 'start_seconds = "100ms"')
            return [*lines, "", f"[programs.{name}.backoff]", 'reset_after = "500ms"']
        if name == CONFIGURED:
            return [
                *lines, "", f"[[programs.{name}.config_files]]", 'path = "live.conf"',
                'on_change = "reload"', 'probation = "500ms"',
            ]  # fmt: skip
        lines = [ln for ln in lines if not ln.startswith("restart =")]
        lines.insert(1, 'restart = "always"')
        lines += ["", f"[programs.{name}.backoff]", 'initial = "100ms"', 'max = "1s"']
        return [*lines, "give_up_after = 0"]


def programs(
    goapp: Path, wd: Path, n: int, stress: bool, flood_bytes: int
) -> list[drivers.Program]:
    g = str(goapp)
    progs = [drivers.Program(HEALTHY, (g, "-name", HEALTHY, "-startfile", str(wd / "healthy")))]
    if not stress:
        return progs
    (wd / "live.conf").write_text("version 0\n")
    conf = str(wd / "live.conf")
    progs.append(drivers.Program(CONFIGURED, (g, "-name", CONFIGURED, "-config", conf)))
    flood = (g, "-name", FLOOD, "-mode", "flood", "-flood-bytes", str(flood_bytes))
    if flood_bytes:
        progs.append(drivers.Program(FLOOD, (*flood, "-startfile", str(wd / "flood"))))
    crash = ("-mode", "exit", "-code", "1", "-startfile", str(wd / "crash"))
    progs += [drivers.Program(f"crash{i:03d}", (g, "-name", f"crash{i:03d}", *crash))
              for i in range(n)]  # fmt: skip
    return progs


# -- the metric -----------------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """The lag histogram: {"0.001": cumulative count, ..., "+Inf": .., "count": .., "sum": ..}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{METRIC}_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith((f"{METRIC}_count", f"{METRIC}_sum")):
            out[line.split(" ", 1)[0].rsplit("_", 1)[1]] = float(line.rsplit(" ", 1)[1])
    if "count" not in out:
        raise common.BenchError(f"no {METRIC} in /metrics")
    return out


def lag_window(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The window's ticks by bucket, with p99 and max as bucket bounds (seconds)."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    n = delta["count"]
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("count", "sum", "+Inf"))
    p99 = next((le for le, c in bounds if c >= 0.99 * n), None) if n else None
    top = next((le for le, c in bounds if c >= n), None) if n else None
    return {
        "ticks": int(n),
        "mean_ms": round(1000 * delta["sum"] / n, 3) if n else None,
        "p99_le_s": p99,  # None: beyond the last bucket
        "max_le_s": top,
        "buckets": {k: int(v) for k, v in delta.items() if k not in ("count", "sum")},
    }


# -- what the loop costs -------------------------------------------------------------


def cpu_snapshot(pid: int, wd: Path) -> dict[str, float]:
    """gosup's CPU and run-queue wait (seconds: its loop thread, all its threads),
    its history's ``started`` records so far, the clock and the load average."""
    out = {"t": time.monotonic(), "load1": os.getloadavg()[0], "cpu": 0.0}
    out["steal"] = steal_seconds()
    out["loop_cpu"] = out["loop_wait"] = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = (int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
        out["cpu"] += run_ns / 1e9
        if int(tid) == pid:
            out["loop_cpu"], out["loop_wait"] = run_ns / 1e9, wait_ns / 1e9
    with open(wd / ".gosup" / "history.jsonl", "rb") as f:
        out["starts"] = sum(1 for line in f if b'"event":"started"' in line)
    return out


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests while this VM's CPUs had work
    (``steal`` in /proc/stat, all CPUs, seconds): the machine giving less,
    which no load average shows."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / (os.sysconf("SC_CLK_TCK") or 100) if len(fields) > 8 else 0.0


def cpu_window(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """The window's CPU: shares of one core, and milliseconds per start."""
    secs, starts = b["t"] - a["t"], b["starts"] - a["starts"]
    per = (lambda k: round(1000 * (b[k] - a[k]) / starts, 2)) if starts else (lambda k: None)
    return {
        "starts": int(starts),
        "loop_cpu_pct": round(100 * (b["loop_cpu"] - a["loop_cpu"]) / secs, 1),
        "all_cpu_pct": round(100 * (b["cpu"] - a["cpu"]) / secs, 1),
        "loop_runq_wait_pct": round(100 * (b["loop_wait"] - a["loop_wait"]) / secs, 1),
        "steal_pct": round(100 * (b["steal"] - a["steal"]) / secs, 1),
        "loop_cpu_ms_per_start": per("loop_cpu"),
        "all_cpu_ms_per_start": per("cpu"),
        "load1": [round(a["load1"], 2), round(b["load1"], 2)],
    }


# -- the load -----------------------------------------------------------------------


class Load:
    """Status requests and staged configs on their own threads, until stopped."""

    def __init__(self, d: drivers.Driver, status_cli: bool) -> None:
        self.d, self.status_cli = d, status_cli
        self.stop = threading.Event()
        self.status_ms: list[float] = []
        self.status_errors: list[str] = []
        self.stages = 0
        self.stage_errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._status_loop, daemon=True),
            threading.Thread(target=self._stage_loop, daemon=True),
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _status_loop(self) -> None:
        sock = self.d.dir / ".gosup" / "gosup.sock"
        nxt = time.monotonic()
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self._status_cli() if self.status_cli else _status_request(sock)
                self.status_ms.append((time.perf_counter() - t0) * 1000)
            except (OSError, ValueError, common.BenchError) as exc:
                self.status_errors.append(str(exc))
            nxt += 1 / STATUS_PER_S
            self.stop.wait(max(0.0, nxt - time.monotonic()))

    def _status_cli(self) -> None:
        run = subprocess.run([*self.d.ctl_command(), "status"], cwd=self.d.dir, env=self.d.env(),
                             capture_output=True, timeout=30)  # fmt: skip
        if run.returncode != 0:
            raise common.BenchError(f"gosup status exited {run.returncode}")

    def _stage_loop(self) -> None:
        nxt = time.monotonic()
        while not self.stop.is_set():
            self.stages += 1
            new = self.d.dir / "new.conf"
            new.write_text(f"version {self.stages}\n")
            argv = [*self.d.ctl_command(), "stage", "--no-wait", str(new), "live.conf"]
            run = subprocess.run(argv, cwd=self.d.dir, env=self.d.env(), capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
            if run.returncode != 0:
                self.stage_errors.append(run.stderr.strip()[-300:])
            nxt += STAGE_EVERY
            self.stop.wait(max(0.0, nxt - time.monotonic()))


def _status_request(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(b'{"cmd": "status"}\n')
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise common.BenchError("gosup closed the connection without a reply")
            buf += chunk
    if not json.loads(buf).get("ok"):
        raise common.BenchError(f"status refused: {buf[:200]!r}")


def kill_healthy(d: drivers.Driver, startfile: Path, every: float, until: float) -> list[dict]:
    """SIGKILL the healthy program every ``every`` s until ``until`` (monotonic);
    each kill: pid, the clock just before it, and the replacement's start stamp."""
    kills: list[dict[str, Any]] = []
    while True:
        pid = common.wait_for(lambda: _current(startfile), 60, "the healthy program")
        # a fresh replacement must be past reset_after (500 ms) to restart at once
        time.sleep(every)
        if time.monotonic() > until:
            return kills
        d.assert_alive()
        seen = len(common.startfile_lines(startfile))
        t_kill = time.time_ns()
        os.kill(pid, signal.SIGKILL)
        new_pid, start_ns = common.wait_for(
            lambda n=seen: (common.startfile_lines(startfile)[n:] or [None])[0], 60, "a replacement"
        )
        kills.append({"pid": pid, "new_pid": new_pid, "latency_ms": (start_ns - t_kill) / 1e6})


def _current(startfile: Path) -> int | None:
    lines = common.startfile_lines(startfile)
    return lines[-1][0] if lines and drivers.pid_alive(lines[-1][0]) else None


# -- the history ------------------------------------------------------------------------


def history(wd: Path) -> list[dict[str, Any]]:
    """Every record, oldest first, across rotated files."""
    base = wd / ".gosup" / "history.jsonl"
    files = sorted(base.parent.glob("history.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    out = []
    for path in [*files, base]:
        if path.exists():
            out += [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return out


def audit(recs: list[dict[str, Any]], wd: Path, kills: list[dict[str, Any]]) -> dict[str, Any]:
    """What happened (start stamps, kills) against what the history says."""
    by_event: dict[str, set[int]] = {}
    for r in recs:
        if "pid" in r and r.get("program"):
            by_event.setdefault(str(r["event"]), set()).add(int(r["pid"]))
    started = by_event.get("started", set())
    ended = by_event.get("exited", set()) | by_event.get("stopped", set())
    out: dict[str, Any] = {}
    for kind in ("crash", "flood", "healthy"):
        pids = [p for p, _ in common.startfile_lines(wd / kind)]
        out[kind] = {
            "processes": len(pids),
            "no_started": sum(1 for p in pids if p not in started),
            "no_end": sum(1 for p in pids if p not in ended),
        }
    out["kills"] = {
        "kills": len(kills),
        "no_exited": sum(1 for k in kills if k["pid"] not in by_event.get("exited", set())),
    }
    out["lost"] = sum(v["no_started"] + v["no_end"] for k, v in out.items() if k != "kills")
    out["lost"] += out["kills"]["no_exited"]
    out["config_applied"] = sum(1 for r in recs if r.get("event") == "config_applied")
    out["config_confirmed"] = sum(1 for r in recs if r.get("event") == "config_confirmed")
    return out


# -- one gosup -----------------------------------------------------------------------------


def phase(goapp: Path, wd: Path, n: int, stress: bool, args: Any) -> dict[str, Any]:
    port = free_ports(1)[0]
    progs = programs(goapp, wd, n, stress, args.flood_bytes)
    every = 2.0 if args.quick else 3.0
    with LagDriver(wd, progs, port) as d:
        d.wait_children(2 if stress else 1, timeout=120)
        common.wait_for(lambda: _current(wd / HEALTHY), 60, "the healthy program")
        if stress and args.flood_bytes:  # every kind of load is on before the window opens
            common.wait_for(lambda: common.startfile_lines(wd / "flood"), 60, "the flood")
        gosup_pid = d.supervisor_pids()[0]
        if args.loop_rt:  # the diagnostic (module docstring); root or CAP_SYS_NICE
            policy = os.SCHED_RR | os.SCHED_RESET_ON_FORK
            os.sched_setscheduler(gosup_pid, policy, os.sched_param(1))
        before, cpu_before = scrape(port), cpu_snapshot(gosup_pid, wd)
        t0 = time.monotonic()
        until = t0 + args.duration
        if stress:
            spy = common.RESULTS / f"profile-{NAME}.txt"
            pid = gosup_pid if args.profile else None
            with (
                profiling.profiled(pid, spy, args.profile) as hot,
                Load(d, args.status_cli) as load,
            ):
                kills = kill_healthy(d, wd / HEALTHY, every, until)
            extra = {
                "status": common.describe(load.status_ms),
                "status_errors": len(load.status_errors),
                "status_error_sample": load.status_errors[:3],
                "stages": load.stages,
                "stage_errors": len(load.stage_errors),
                "stage_error_sample": load.stage_errors[:3],
                **({"profile": hot} if hot else {}),
            }
        else:
            kills, extra = kill_healthy(d, wd / HEALTHY, every, until), {}
        after, cpu = scrape(port), cpu_window(cpu_before, cpu_snapshot(gosup_pid, wd))
        seconds = time.monotonic() - t0
        d.graceful_stop(120)
    lat = [k["latency_ms"] for k in kills]
    return {
        "seconds": round(seconds, 1),
        "lag": lag_window(before, after),
        "restart_ms": common.describe(lat),
        "cpu": cpu,
        "kills": kills,
        "history": audit(history(wd), wd, kills),
        "leftovers": d.leftovers,
        **extra,
    }


def report(quiet: dict[str, Any], stress: dict[str, Any], n: int) -> tuple[list, list]:
    def ms(v: float | None) -> str:
        return "> 10 s" if v is None else f"<= {v * 1000:g} ms"

    rows = []
    for label, r in (("quiet", quiet), (f"stress ({n} crash-looping + the rest)", stress)):
        lag, rs = r["lag"], r["restart_ms"]
        rows.append([
            label, r["seconds"], lag["ticks"], lag["mean_ms"], ms(lag["p99_le_s"]),
            ms(lag["max_le_s"]), rs.get("n"), rs.get("p50"), rs.get("max"), r["history"]["lost"],
        ])  # fmt: skip
    cols = ["phase", "seconds", "loop ticks", "lag mean ms", "lag p99", "lag max", "kills"]
    cols += ["restart p50 ms", "restart max ms", "lost records"]
    tab = common.table("Event-loop lag (gosup_event_loop_lag_seconds) and restarts", cols, rows)
    h = stress["history"]
    st = stress.get("status", {})
    load = common.table(
        "The stress load (gosup only: no incumbent exports its loop's lag)",
        ["crash-loop starts", "flood runs", "status asked", "status p50 ms", "status p99 ms",
         "status errors", "stages", "stage errors", "config_applied", "config_confirmed"],
        [[h["crash"]["processes"], h["flood"]["processes"], st.get("n"), st.get("p50"),
          st.get("p99"), stress.get("status_errors"), stress.get("stages"),
          stress.get("stage_errors"), h["config_applied"], h["config_confirmed"]]],
    )  # fmt: skip
    cost = common.table(
        "What the loop costs (% of one core; run-queue wait: the loop ready, no CPU free)",
        ["phase", "starts", "loop CPU %", "all threads CPU %", "loop run-queue wait %",
         "loop CPU ms/start", "all CPU ms/start", "load avg (begin, end)", "steal %"],
        [[label, c["starts"], c["loop_cpu_pct"], c["all_cpu_pct"], c["loop_runq_wait_pct"],
          c["loop_cpu_ms_per_start"], c["all_cpu_ms_per_start"], c["load1"],
          c.get("steal_pct", "-")]
         for label, c in (("quiet", quiet["cpu"]), ("stress", stress["cpu"]))],
    )  # fmt: skip
    lag = stress["lag"]
    q50, s50 = quiet["restart_ms"].get("p50"), stress["restart_ms"].get("p50")
    targets = [
        {"target": "under stress: loop lag p99 <= 10 ms", "measured": ms(lag["p99_le_s"]),
         "met": None if not lag["ticks"] else (lag["p99_le_s"] or 99) <= T_P99},
        {"target": "under stress: loop lag max <= 50 ms", "measured": ms(lag["max_le_s"]),
         "met": None if not lag["ticks"] else (lag["max_le_s"] or 99) <= T_MAX},
        {"target": "under stress: restart p50 <= 2x quiet",
         "measured": "-" if not (q50 and s50) else f"{s50:.1f} vs {q50:.1f} ms = {s50 / q50:.2f}x",
         "met": None if not (q50 and s50) else s50 <= 2 * q50},
        {"target": "under stress: 0 lost history records",
         "measured": f"{h['lost']} lost ({h['crash']['processes']} crash-loop runs, "
                     f"{h['kills']['kills']} kills)",
         "met": h["lost"] == 0},
    ]  # fmt: skip
    return [tab, load, cost], targets


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--programs", type=int, help="crash-looping programs (default 200, quick 50)")
    p.add_argument("--duration", type=float, help="seconds of each phase (default 60, quick 12)")
    p.add_argument("--status-cli", action="store_true", help="ask with `gosup status` itself")
    p.add_argument(
        "--loop-rt",
        action="store_true",
        help="diagnostic: gosup's loop thread SCHED_RR (waits for no CPU); not the measurement",
    )
    p.add_argument(
        "--flood-bytes",
        type=int,
        default=FLOOD_BYTES,
        help="bytes of each flood run (default 1 GB; 0: no flood program)",
    )
    args = p.parse_args()
    n = args.programs if args.programs is not None else (50 if args.quick else 200)
    args.duration = args.duration or (12.0 if args.quick else 60.0)
    goapp = common.goapp()
    info = drivers.availability(["gosup"])
    results: dict[str, Any] = {}
    for label, stress in (("quiet", False), ("stress", True)):
        common.log(f"{label}: {n if stress else 0} crash-looping programs, {args.duration:g}s")
        with common.workdir(f"lag-{label}", args.keep) as wd:
            try:
                results[label] = phase(goapp, wd, n, stress, args)
            except common.BenchError as exc:
                results[label] = {"error": str(exc)}
    if any("error" in r for r in results.values()):
        errors = {k: v["error"] for k, v in results.items() if "error" in v}
        tabs = [common.table("Event-loop lag", ["phase", "error"], list(errors.items()))]
        targets = [{"target": "loop lag under stress", "measured": str(errors), "met": None}]
    else:
        tabs, targets = report(results["quiet"], results["stress"], n)
    common.print_tables(tabs)
    for t in targets:
        print(f"{t['target']}: {t['measured']} -> {t['met']}")
    params = {"crash_looping": n, "flood_bytes": args.flood_bytes, "status_per_s": STATUS_PER_S,
              "stage_every_s": STAGE_EVERY, "duration_s": args.duration,
              "status_via": "cli" if args.status_cli else "socket",
              "loop_rt": args.loop_rt}  # fmt: skip
    data = {"params": params, "versions": info, "results": results, "targets": targets}
    common.write_result(NAME, args.quick, {**data, "tables": tabs})


if __name__ == "__main__":
    main()
