"""Restart latency: SIGKILL the child of a healthy program, time until the
replacement has started.

The program is goapp with ``-startfile PATH``: every start appends
"<pid> <unix nanos>" taken by the new process itself, so the latency is
(start stamp of the replacement) - (wall clock just before our kill), with no
polling error. Two ways, in the same run:

- tuned: one program killed ``--kills`` times, ``--gap`` seconds after each
  restart, each supervisor set so that such a crash restarts at once (gosup
  start_seconds 100ms + reset_after 500ms, supervisord startsecs 0, PM2
  min_uptime 500, circus check_delay 0.1 and 0.01);
- defaults: each supervisor as shipped, ``--programs`` programs started at
  once and left running past its own reset window (gosup: backoff.reset_after,
  60 s), then each killed once, one after the other, so the wait is paid once
  for all supervisors (their instances are started first and age while the
  floor and the tuned rows are measured).

The floor is the least any supervisor can do, timed from the same point: this
script kills its own child, reaps it (waitpid), starts the same binary again
with ``subprocess.Popen`` and waits for its start line. ``--breakdown`` splits
gosup's and the floor's latency into detection, bookkeeping, fork/exec and Go
start (kernel tracepoints through ``perf`` and timestamps inside gosup).

    python bench/restart_latency.py [--quick] [--supervisors gosup,pm2] [--breakdown]
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import drivers
import profiling
import restart_trace
import targets

NAME = "restart_latency"
KILL_TIMEOUT = 30.0  # a replacement later than this counts as a failed restart
AGE_MARGIN = 2.0  # seconds past a supervisor's reset window before its first kill
PAUSE = 0.2  # seconds between two kills of different programs (defaults)


@dataclass(frozen=True)
class Variant:
    """A row: a supervisor with the settings it is measured with."""

    key: str  # in the result JSON
    supervisor: str
    settings: drivers.Settings
    label: str  # the settings, as the table shows them


def tuned_variants(names: list[str]) -> list[Variant]:
    out = []
    for name in names:
        fast = drivers.Settings(fast_restart=True)
        if name == "circus":
            out.append(Variant("circus", name, fast, "check_delay 0.1"))
            fast = drivers.Settings(fast_restart=True, check_delay=0.01)
            out.append(Variant("circus-0.01", name, fast, "check_delay 0.01"))
            continue
        label = {
            "gosup": "start_seconds 100ms, reset_after 500ms",
            "supervisord": "startsecs 0",
            "pm2": "min_uptime 500, restart_delay 0",
        }[name]
        out.append(Variant(name, name, fast, label))
    return out


def default_variants(names: list[str]) -> list[Variant]:
    labels = {
        "gosup": "defaults (reset_after 60s)",
        "supervisord": "defaults (startsecs 1)",
        "circus": "defaults (check_delay 5)",
        "pm2": "defaults (min_uptime 1000)",
    }
    return [Variant(n, n, drivers.Settings(), labels[n]) for n in names]


def _new_start(startfile: Path, seen: int) -> tuple[int, int] | None:
    lines = common.startfile_lines(startfile)
    return lines[seen] if len(lines) > seen else None


def _wait_start(startfile: Path, seen: int, what: str) -> tuple[int, int]:
    """(pid, unix nanos) of the start after the first ``seen`` ones."""
    return common.wait_for(
        functools.partial(_new_start, startfile, seen), KILL_TIMEOUT, what, poll=0.005
    )


# -- the floor ---------------------------------------------------------------------


def measure_floor(goapp: Path, wd: Path, kills: int, trace: Path | None = None) -> Latencies:
    """Kill our own goapp child, reap it, start it again, until its start line.

    With ``trace``: the moments this script reaped the child and called Popen,
    as CLOCK_MONOTONIC nanos (``restart_trace`` marks), for the breakdown."""
    startfile = wd / "floor.starts"
    argv = [str(goapp), "-name", "floor", "-startfile", str(startfile)]
    tag = common.new_tag()
    out = Latencies()
    marks = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115 - closed below

    def start() -> subprocess.Popen[bytes]:
        called = time.monotonic_ns()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=common.bench_env(tag),
            start_new_session=True,
        )
        if marks is not None:
            marks.write(f"{called} popen {proc.pid}\n")
        return proc

    proc = start()
    try:
        _wait_start(startfile, 0, "floor: first start")
        for i in range(kills):
            time.sleep(PAUSE)
            t_kill = time.time_ns()
            proc.kill()
            proc.wait()
            if marks is not None:
                marks.write(f"{time.monotonic_ns()} cb\n")
            proc = start()
            pid, ns = _wait_start(startfile, i + 1, "floor start")
            out.add(pid, (ns - t_kill) / 1e6)
    finally:
        proc.kill()
        proc.wait(10)
        if marks is not None:
            marks.close()
        common.sweep(tag)
    return out


# -- a supervisor ------------------------------------------------------------------


class Latencies(list[float]):
    """Restart latencies in ms, and the replacement's pid of each."""

    def __init__(self) -> None:
        super().__init__()
        self.by_pid: dict[int, float] = {}

    def add(self, pid: int, ms: float) -> None:
        self.append(ms)
        self.by_pid[pid] = ms


def _kill(d: drivers.Driver, startfile: Path, out: Latencies, errors: list[str]) -> bool:
    """SIGKILL the program's current child (from its startfile), wait for the
    replacement's start line; False when that failed (the error is in ``errors``)."""
    lines = common.startfile_lines(startfile)
    pid = lines[-1][0]
    d.assert_alive()
    if pid not in d.child_pids().values():  # never kill a pid that is not our child
        errors.append(f"pid {pid} from the startfile is not {d.name}'s child")
        return False
    t_kill = time.time_ns()
    os.kill(pid, signal.SIGKILL)
    try:
        new, ns = _wait_start(startfile, len(lines), f"{d.name}: restart")
    except common.BenchError as exc:
        errors.append(str(exc))
        return False
    out.add(new, (ns - t_kill) / 1e6)
    return True


def measure_tuned(
    v: Variant, goapp: Path, wd: Path, kills: int, gap: float, profile: Path | None = None
) -> dict[str, Any]:
    """Kill one program's child ``kills`` times, ``gap`` seconds after each restart
    (with ``profile``: gosup is sampled by py-spy meanwhile, stacks written there)."""
    startfile = wd / "lat.starts"
    prog = drivers.Program("lat", (str(goapp), "-name", "lat", "-startfile", str(startfile)))
    latencies = Latencies()
    errors: list[str] = []
    with drivers.make(v.supervisor, wd, [prog], v.settings) as d:
        common.wait_for(lambda: common.startfile_lines(startfile), 120, f"{v.key}: first start")
        time.sleep(gap)
        spied = d.supervisor_pids()[0] if profile else None
        # 1000 Hz: a restart is a few ms of gosup's time, 200 Hz would hardly see it.
        with profiling.profiled(spied, profile or wd / "none", profile is not None, 1000) as hot:
            for _ in range(kills):
                if not _kill(d, startfile, latencies, errors):
                    break
                time.sleep(gap)  # let the new run become healthy before the next kill
        extra = _gosup_backoffs(wd) if v.supervisor == "gosup" else {}
    result = _result(latencies, errors, d.leftovers, **extra)
    if hot:
        result["profile"] = hot
    return result


class Aged:
    """A supervisor as shipped, with ``n`` programs started at once, killed
    each once when every run is older than the supervisor's reset window."""

    def __init__(self, v: Variant, goapp: Path, wd: Path, n: int) -> None:
        self.v = v
        self.files = [wd / f"p{i}.starts" for i in range(n)]
        progs = [
            drivers.Program(f"p{i}", (str(goapp), "-name", f"p{i}", "-startfile", str(f)))
            for i, f in enumerate(self.files)
        ]
        self.driver = drivers.make(v.supervisor, wd, progs, v.settings)
        self.error: str | None = None
        self.stopped = False

    def start(self) -> None:
        try:
            self.driver.__enter__()
            common.wait_for(
                lambda: all(common.startfile_lines(f) for f in self.files),
                120,
                f"{self.v.key} (defaults): {len(self.files)} first starts",
            )
        except common.BenchError as exc:
            self.error = str(exc)

    def measure(self) -> dict[str, Any]:
        if self.error is not None:
            return {"stats": {"n": 0}, "errors": [self.error]}
        window = self.driver.reset_window + AGE_MARGIN
        newest = max(common.startfile_lines(f)[-1][1] for f in self.files) / 1e9
        wait = newest + window - time.time()
        if wait > 0:
            common.log(f"{self.v.key} (defaults): runs older than {window:g}s in {wait:.0f}s")
            time.sleep(wait)
        latencies = Latencies()
        errors: list[str] = []
        for f in self.files:
            if not _kill(self.driver, f, latencies, errors):
                break
            time.sleep(PAUSE)
        self.stop()
        extra = _gosup_backoffs(self.driver.dir) if self.v.supervisor == "gosup" else {}
        return _result(latencies, errors, self.driver.leftovers, **extra)

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.driver.stop()


def _result(
    latencies: list[float], errors: list[str], leftovers: int, **extra: Any
) -> dict[str, Any]:
    return {
        "latencies_ms": [round(x, 3) for x in latencies],
        "stats": common.describe(latencies),
        "errors": errors,
        "leftovers": leftovers,
        **extra,
    }


def _gosup_backoffs(wd: Path) -> dict[str, Any]:
    """gosup's own account: every crash restart should have been immediate (delay 0)."""
    path = wd / ".gosup" / "history.jsonl"
    delays = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "backoff":
                delays.append(rec.get("delay_s", 0.0))
    return {"delayed_restarts": sum(1 for d in delays if d > 0)}


# -- tables and targets --------------------------------------------------------------


def build_table(
    title: str, variants: list[Variant], results: dict[str, Any], info: dict[str, Any], n: int
) -> dict[str, Any]:
    floor = results.get("floor", {}).get("stats", {}).get("p50")
    rows: list[list[Any]] = []
    fl = results.get("floor", {}).get("stats", {})
    ratio = common.ratio(fl.get("p50"), floor)
    rows.append(["floor", "-", "kill, waitpid, Popen", fl.get("p50"), fl.get("p90"),
                 fl.get("max"), ratio, str(fl.get("n", 0))])  # fmt: skip
    for v in variants:
        res = results.get(v.key, {})
        st = res.get("stats", {})
        version = info.get(v.supervisor, {}).get("version")
        if "unavailable" in res:
            rows.append([v.supervisor, version, v.label, None, None, None, None,
                         f"skipped: {res['unavailable']}"])  # fmt: skip
            continue
        ok = f"{st.get('n', 0)}/{n}" + (f" ({res['errors'][0]})" if res.get("errors") else "")
        rows.append([
            v.supervisor, version, v.label, st.get("p50"), st.get("p90"), st.get("max"),
            common.ratio(st.get("p50"), floor), ok,
        ])  # fmt: skip
    cols = ["supervisor", "version", "settings", "p50 ms", "p90 ms", "max ms", "p50 / floor"]
    return common.table(title, [*cols, "restarts"], rows)


# -- the breakdown -------------------------------------------------------------------


def breakdown(goapp: Path, kills: int, gap: float, keep: bool) -> dict[str, Any]:
    """gosup (tuned) and the floor, each under ``restart_trace``: ms per stage."""
    out: dict[str, Any] = {}
    with common.workdir("breakdown-floor", keep) as wd:
        trace = wd / "trace"
        with restart_trace.kernel_events(wd / "perf.data") as events:
            lat = measure_floor(goapp, wd, kills, trace)
        out["floor"] = restart_trace.stages(events(), trace, wd / "floor.starts", lat.by_pid)
    with common.workdir("breakdown-gosup", keep) as wd:
        trace = wd / "trace"
        settings = drivers.Settings(fast_restart=True)
        startfile = wd / "lat.starts"
        prog = drivers.Program("lat", (str(goapp), "-name", "lat", "-startfile", str(startfile)))
        lat = Latencies()
        errors: list[str] = []
        with (
            restart_trace.kernel_events(wd / "perf.data") as events,
            restart_trace.TracedGosup(wd, [prog], settings, trace) as d,
        ):
            common.wait_for(lambda: common.startfile_lines(startfile), 120, "first start")
            time.sleep(gap)
            for _ in range(kills):
                if not _kill(d, startfile, lat, errors):
                    break
                time.sleep(gap)
        out["gosup"] = restart_trace.stages(events(), trace, startfile, lat.by_pid)
        out["gosup"]["errors"] = errors
    return out


# -- main -------------------------------------------------------------------------------


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, help="tuned: kills per supervisor (default 20, --quick 10)")
    p.add_argument(
        "--programs", type=int, help="defaults: programs per supervisor (default 20, --quick 5)"
    )
    p.add_argument(
        "--gap", type=float, default=1.0, help="tuned: seconds between a restart and the next kill"
    )
    p.add_argument("--ways", default="tuned,defaults", help="tuned, defaults or both (default)")
    p.add_argument(
        "--breakdown", action="store_true", help="only the stage breakdown of gosup and the floor"
    )
    args = p.parse_args()
    kills = args.kills or (10 if args.quick else 20)
    n_aged = args.programs or (5 if args.quick else 20)
    goapp = common.goapp()
    if args.breakdown:
        data = breakdown(goapp, kills, args.gap, args.keep)
        tab = restart_trace.table(data)
        common.print_tables([tab])
        common.write_result(f"{NAME}_breakdown", args.quick, {"results": data, "tables": [tab]})
        return
    ways = {w.strip() for w in args.ways.split(",")}
    names = common.selected(args)
    info = drivers.availability(names)
    usable = [n for n in names if info[n]["ok"]]
    tuned = tuned_variants(names) if "tuned" in ways else []
    defaults = default_variants(names) if "defaults" in ways else []
    results: dict[str, Any] = {"tuned": {}, "defaults": {}}
    for v in tuned + defaults:
        if v.supervisor not in usable:
            part = results["tuned" if v in tuned else "defaults"]
            part[v.key] = {"unavailable": info[v.supervisor]["reason"]}
    with contextlib.ExitStack() as stack:
        aged: list[Aged] = []
        for v in defaults:  # started first: they age while the rest is measured
            if v.supervisor in usable:
                wd = stack.enter_context(common.workdir(f"{v.key}-defaults", args.keep))
                a = Aged(v, goapp, wd, n_aged)
                stack.callback(a.stop)
                common.log(f"{v.key} (defaults): starting {n_aged} programs")
                a.start()
                aged.append(a)
        # The aged instances (PM2's daemon, node, 80 Go programs) take seconds
        # to start: the floor, measured next, must not share the CPUs with that.
        quiet_s = common.wait_quiet()
        with common.workdir("floor", args.keep) as wd:
            common.log(f"floor: {kills} kills (after {quiet_s:.1f}s for the machine to go quiet)")
            lat = measure_floor(goapp, wd, kills)
        results["floor"] = {
            "latencies_ms": [round(x, 3) for x in lat],
            "stats": common.describe(lat),
        }
        for v in tuned:
            if v.supervisor not in usable:
                continue
            common.log(f"{v.key}: {kills} kills, {args.gap:g}s apart")
            with common.workdir(v.key, args.keep) as wd:
                spy = common.RESULTS / f"profile-{NAME}.txt" if args.profile else None
                try:
                    results["tuned"][v.key] = measure_tuned(
                        v, goapp, wd, kills, args.gap, spy if v.key == "gosup" else None
                    )
                except common.BenchError as exc:
                    results["tuned"][v.key] = {"stats": {"n": 0}, "errors": [str(exc)]}
        for a in aged:
            common.log(f"{a.v.key} (defaults): {n_aged} programs, each killed once")
            try:
                results["defaults"][a.v.key] = a.measure()
            except common.BenchError as exc:
                results["defaults"][a.v.key] = {"stats": {"n": 0}, "errors": [str(exc)]}
    tables = []
    for kind, variants, n in (("tuned", tuned, kills), ("defaults", defaults, n_aged)):
        if not variants:
            continue
        part = {"floor": results["floor"], **results[kind]}
        title = (
            f"Restart latency, tuned ({kills} SIGKILLs of one program, {args.gap:g} s apart)"
            if kind == "tuned"
            else f"Restart latency, as shipped ({n_aged} programs past the reset window, "
            "each killed once)"
        )
        tables.append(build_table(title, variants, part, info, n))
    common.print_tables(tables)
    for row in targets.restart({"results": results}):
        common.log(f"target {row['target']}: {row['measured']} ({row['result']})")
    params = {"kills": kills, "programs": n_aged, "gap_s": args.gap, "ways": sorted(ways)}
    params["floor_quiet_wait_s"] = round(quiet_s, 1)
    data = {
        "params": params,
        "versions": info,
        "results": results,
        "tables": tables,
    }
    common.write_result(NAME, args.quick, data)


if __name__ == "__main__":
    sys.exit(main())
