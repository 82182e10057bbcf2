"""Restart latency: SIGKILL the child of a healthy program, time until the
replacement has started.

The program is goapp with ``-startfile PATH``: every start appends
"<pid> <unix nanos>" taken by the new process itself, so the latency is
(start stamp of the replacement) - (wall clock just before our kill), with no
polling error. The floor is the same binary started directly (fork + exec
until its startfile line appears). Each supervisor is configured so that a
single crash of a healthy program restarts at once (see docs/benchmarks.md).

    python bench/restart_latency.py [--quick] [--supervisors gosup,pm2]
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import drivers
import profiling

NAME = "restart_latency"
KILL_TIMEOUT = 30.0  # a replacement later than this counts as a failed restart


def _new_start(startfile: Path, seen: int) -> tuple[int, int] | None:
    lines = common.startfile_lines(startfile)
    return lines[seen] if len(lines) > seen else None


def measure_floor(goapp: Path, wd: Path, kills: int) -> list[float]:
    """fork+exec of goapp until its startfile line appears, in ms."""
    startfile = wd / "floor.starts"
    tag = common.new_tag()
    out = []
    try:
        for i in range(kills):
            t0 = time.time_ns()
            proc = subprocess.Popen(
                [str(goapp), "-name", "floor", "-startfile", str(startfile)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=common.bench_env(tag),
                start_new_session=True,
            )
            try:
                _, ns = common.wait_for(
                    functools.partial(_new_start, startfile, i),
                    KILL_TIMEOUT,
                    "floor start",
                    poll=0.005,
                )
                out.append((ns - t0) / 1e6)
            finally:
                proc.kill()
                proc.wait(10)
            time.sleep(0.2)
    finally:
        common.sweep(tag)
    return out


def measure(
    name: str, goapp: Path, wd: Path, kills: int, gap: float, profile: Path | None = None
) -> dict[str, Any]:
    """Kill the program's child ``kills`` times, ``gap`` seconds after each restart
    (with ``profile``: gosup is sampled by py-spy meanwhile, stacks written there)."""
    startfile = wd / "lat.starts"
    prog = drivers.Program("lat", (str(goapp), "-name", "lat", "-startfile", str(startfile)))
    settings = drivers.Settings(fast_restart=True)
    with drivers.make(name, wd, [prog], settings) as d:
        common.wait_for(lambda: common.startfile_lines(startfile), 120, f"{name}: first start")
        time.sleep(gap)
        spied = d.supervisor_pids()[0] if profile else None
        # 1000 Hz: a restart is a few ms of gosup's time, 200 Hz would hardly see it.
        with profiling.profiled(spied, profile or wd / "none", profile is not None, 1000) as hot:
            latencies, errors = _kill_loop(d, startfile, kills, gap)
        extra = _gosup_backoffs(wd) if name == "gosup" else {}
    result: dict[str, Any] = {"latencies_ms": [round(x, 3) for x in latencies]}
    result.update(stats=common.describe(latencies), errors=errors, leftovers=d.leftovers, **extra)
    if hot:
        result["profile"] = hot
    return result


def _kill_loop(
    d: drivers.Driver, startfile: Path, kills: int, gap: float
) -> tuple[list[float], list[str]]:
    """SIGKILL the current child, wait for its replacement's start line; repeat."""
    latencies: list[float] = []
    errors: list[str] = []
    for _ in range(kills):
        lines = common.startfile_lines(startfile)
        pid = lines[-1][0]
        d.assert_alive()
        if pid not in d.child_pids().values():  # never kill a pid that is not our child
            errors.append(f"pid {pid} from the startfile is not {d.name}'s child")
            break
        seen = len(lines)
        t_kill = time.time_ns()
        os.kill(pid, signal.SIGKILL)
        try:
            _, ns = common.wait_for(
                functools.partial(_new_start, startfile, seen),
                KILL_TIMEOUT,
                f"{d.name}: restart",
                poll=0.005,
            )
        except common.BenchError as exc:
            errors.append(str(exc))
            break
        latencies.append((ns - t_kill) / 1e6)
        time.sleep(gap)  # let the new run become healthy before the next kill
    return latencies, errors


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


def build_table(results: dict[str, Any], info: dict[str, Any], kills: int) -> dict[str, Any]:
    floor = results.get("floor", {}).get("stats", {}).get("p50")
    rows = []
    for name, res in results.items():
        st = res.get("stats", {})
        version = "-" if name == "floor" else info.get(name, {}).get("version")
        if "unavailable" in res:
            rows.append([name, version, None, None, None, None, f"skipped: {res['unavailable']}"])
            continue
        ok = f"{st.get('n', 0)}/{kills}" + (f" ({res['errors'][0]})" if res.get("errors") else "")
        rows.append([
            name, version, st.get("p50"), st.get("p90"), st.get("max"),
            common.ratio(st.get("p50"), floor), ok,
        ])  # fmt: skip
    cols = ["supervisor", "version", "p50 ms", "p90 ms", "max ms", "p50 / floor", "restarts"]
    return common.table(f"Restart latency ({kills} SIGKILLs)", cols, rows)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, help="kills per supervisor (default 20, --quick 10)")
    p.add_argument(
        "--gap", type=float, default=1.0, help="seconds between a restart and the next kill"
    )
    args = p.parse_args()
    kills = args.kills or (10 if args.quick else 20)
    names = common.selected(args)
    goapp = common.goapp()
    info = drivers.availability(names)
    results: dict[str, Any] = {}
    with common.workdir("floor", args.keep) as wd:
        common.log(f"floor: {kills} direct starts")
        lat = measure_floor(goapp, wd, kills)
        results["floor"] = {
            "latencies_ms": [round(x, 3) for x in lat],
            "stats": common.describe(lat),
        }
    for name in names:
        if not info[name]["ok"]:
            results[name] = {"unavailable": info[name]["reason"]}
            continue
        common.log(f"{name}: {kills} kills, {args.gap:g}s apart")
        with common.workdir(name, args.keep) as wd:
            try:
                spy = common.RESULTS / f"profile-{NAME}.txt" if args.profile else None
                results[name] = measure(
                    name, goapp, wd, kills, args.gap, spy if name == "gosup" else None
                )
            except common.BenchError as exc:
                results[name] = {"stats": {"n": 0}, "errors": [str(exc)]}
    tab = build_table(results, info, kills)
    common.print_tables([tab])
    params = {"kills": kills, "gap_s": args.gap}
    data = {"params": params, "versions": info, "results": results, "tables": [tab]}
    common.write_result(NAME, args.quick, data)


if __name__ == "__main__":
    main()
