"""Overhead: what a supervisor costs while its programs idle.

50 and 200 idle goapp programs for 60 s (--quick: 10 s), after every child is
up and a settle period has passed (start-up work is not counted). Measured on
the supervisor's own process(es) only, never the children: CPU seconds per
minute (user + system, summed from each thread's scheduler runtime, which
the kernel keeps in nanoseconds: an idle supervisor uses a few 10 ms clock
ticks a minute, too few to compare) and RSS (the largest of one sample a
second). For pm2 that is its God daemon. gosup is measured three ways: as
shipped (the defaults: no [limits], and its sampler still reads every
program every 5 s for status and metrics), with sampling off
(GOSUP_SAMPLING=0), and with limits set (a [limits] section with interval =
"5s" on every program). The targets (issue 18) are judged on gosup as
shipped against supervisord in the same run, both CPU and RSS as ratios.

    python bench/overhead.py [--quick] [--counts 50,200] [--duration 60]
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import common
import drivers
import profiling

NAME = "overhead"
# The gosup variants, each measured like a supervisor of its own.
GOSUP_VARIANTS = {
    "gosup": drivers.Settings(),  # as shipped: the targets are judged on this one
    "gosup-sampling-off": drivers.Settings(sampling_off=True),
    "gosup-limits": drivers.Settings(sampling=True),
}


def measure(
    name: str, goapp: Path, wd: Path, n: int, duration: float, settle: float, spy: Path | None
) -> dict[str, Any]:
    kind = "gosup" if name in GOSUP_VARIANTS else name
    settings = GOSUP_VARIANTS.get(name, drivers.Settings())
    progs = [drivers.Program(f"p{i:03d}", (str(goapp), "-name", f"p{i:03d}")) for i in range(n)]
    t0 = time.monotonic()  # before the start: pm2's CLI returns once its apps are up
    with drivers.make(kind, wd, progs, settings) as d:
        before = d.wait_children(n, timeout=max(120.0, 1.5 * n))
        startup = time.monotonic() - t0
        time.sleep(settle)
        pids = d.supervisor_pids()
        spied = pids[0] if spy is not None and kind == "gosup" else None
        with profiling.profiled(spied, spy or wd / "none", spied is not None) as hot:
            cpu, rss = _window(d, pids, duration)
        after = d.child_pids()
    result: dict[str, Any] = {
        "programs": n,
        "cpu_s_per_min": round(cpu, 4),
        "rss_mib": round(max(rss) / common.MiB, 2),
        "rss_mean_mib": round(sum(rss) / len(rss) / common.MiB, 2),
        "startup_s": round(startup, 2),
        "supervisor_pids": len(pids),
        "children_restarted": sum(1 for k, v in before.items() if after.get(k) != v),
        "leftovers": d.leftovers,
    }
    if hot:
        result["profile"] = hot
    return result


def _window(d: drivers.Driver, pids: list[int], duration: float) -> tuple[float, list[int]]:
    """CPU seconds per minute over ``duration``, and one RSS sample per second."""
    c0, t0 = cpu_seconds(pids), time.monotonic()
    end = t0 + duration
    rss = [common.rss_bytes(pids)]
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        d.assert_alive()
        rss.append(common.rss_bytes(pids))
    c1, t1 = cpu_seconds(pids), time.monotonic()
    return (c1 - c0) / (t1 - t0) * 60, rss


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of these processes' threads (``se.sum_exec_runtime`` of
    /proc/PID/task/TID/sched, exact to the microsecond), or the 10 ms clock
    ticks of /proc/PID/stat where the kernel does not show it. Threads that
    ended meanwhile are not counted: gosup's and the incumbents' threads
    live as long as they do."""
    total = 0.0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            ms = _runtime_ms(f"/proc/{pid}/task/{tid}/sched")
            if ms is None:
                return common.cpu_seconds(pids)
            total += ms / 1000
    return total


def _runtime_ms(path: str) -> float | None:
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            if line.startswith("se.sum_exec_runtime"):
                return float(line.split(":")[1])
        return None
    return 0.0  # the thread ended between the listing and the read


def build_table(results: dict[str, dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    rows = []
    for n in counts:
        ref = results[str(n)].get("supervisord", {})
        for name, res in results[str(n)].items():
            if "cpu_s_per_min" not in res:
                rows.append([name, n, None, None, None, None, None, res.get("error", "-")])
                continue
            rows.append([
                name, n, res["cpu_s_per_min"], res["rss_mib"],
                common.ratio(res["cpu_s_per_min"], ref.get("cpu_s_per_min")),
                common.ratio(res["rss_mib"], ref.get("rss_mib")),
                res["startup_s"], res.get("note", ""),
            ])  # fmt: skip
    cols = ["supervisor", "programs", "CPU-s/min", "RSS MiB", "CPU x sd", "RSS x sd"]
    cols += ["startup s", "note"]
    return common.table("Overhead of idle programs (sd = supervisord, same run)", cols, rows)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="50,200", help="program counts (default 50,200)")
    p.add_argument("--duration", type=float, help="seconds measured (default 60, --quick 10)")
    args = p.parse_args()
    duration = args.duration or (10.0 if args.quick else 60.0)
    settle = 3.0 if args.quick else 5.0
    counts = [int(c) for c in args.counts.split(",")]
    names = common.selected(args)
    variants = [v for n in names for v in (list(GOSUP_VARIANTS) if n == "gosup" else [n])]
    goapp = common.goapp()
    info = drivers.availability(names)
    results: dict[str, dict[str, Any]] = {}
    for n in counts:
        results[str(n)] = {}
        for variant in variants:
            kind = "gosup" if variant in GOSUP_VARIANTS else variant
            if not info[kind]["ok"]:
                results[str(n)][variant] = {"error": f"skipped: {info[kind]['reason']}"}
                continue
            common.log(f"{variant}: {n} idle programs, {duration:g}s")
            spy = common.RESULTS / f"profile-{NAME}-{variant}-{n}.txt" if args.profile else None
            with common.workdir(f"{variant}-{n}", args.keep) as wd:
                try:
                    res = measure(variant, goapp, wd, n, duration, settle, spy)
                except common.BenchError as exc:
                    res = {"error": str(exc)}
            results[str(n)][variant] = res
    tab = build_table(results, counts)
    common.print_tables([tab])
    params = {"counts": counts, "duration_s": duration, "settle_s": settle}
    data = {"params": params, "versions": info, "results": results, "tables": [tab]}
    common.write_result(NAME, args.quick, data)


if __name__ == "__main__":
    main()
