"""Leak detection: from a program's RSS crossing its limit to gosup acting,
beside the bound the config promises (interval x sustain).

goapp leaks heap (``-leak-heap``, a chunk every second) under a gosup whose
program has ``[limits] rss``; gosup restarts it each time (reason "leak") and
the new process leaks again, so one run gives several cycles. We watch the
child's RSS ourselves every 10 ms to know when it crossed the limit; gosup's
history gives ``limit_exceeded`` (detected) and ``stopped`` (killed and gone)
for the same run: each crossing is paired with the records of its own pid's
run, and a crossing with no kill is reported missing (never dropped).
Detection must come within interval x sustain of the crossing: the first
sample over the limit is at most one interval late, and sustain - 1 more
samples follow.

    python bench/leak_detection.py [--quick] [--cycles 5]
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import drivers
import psutil
from drivers import gosup as gosup_driver

NAME = "leak_detection"
LIMIT = 100 * common.MiB
LEAK_PER_S = 20_000_000
SLACK = 0.1  # seconds: our 10 ms watch, the ms stamps of the history, scheduling
CONFIGS = ((0.5, 3), (1.0, 2))  # (interval s, sustain)


class LeakDriver(gosup_driver.GosupDriver):
    """gosup with an rss limit on every program (no evidence: goapp serves no pprof here)."""

    def __init__(self, wd: Path, progs: list[drivers.Program], interval: float, sustain: int):
        super().__init__(wd, progs, drivers.Settings())
        self.interval, self.sustain = interval, sustain

    def _program(self, name: str, argv: tuple[str, ...]) -> list[str]:
        lines = super()._program(name, argv)
        lines += ["", f"[programs.{name}.limits]", f'interval = "{self.interval * 1000:g}ms"']
        lines += [f"sustain = {self.sustain}", f"rss = {LIMIT}", 'evidence = "none"']
        return lines


def _ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(rec["ts"]).replace("Z", "+00:00")).timestamp()


def _history(wd: Path) -> list[dict[str, Any]]:
    path = wd / ".gosup" / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _watch(
    startfile: Path, wd: Path, cycles: int, timeout: float, d: drivers.Driver
) -> dict[int, float]:
    """pid -> wall clock when its RSS first reached LIMIT, until ``cycles`` leak
    stops, and until every crossing we saw has been acted on (its pid stopped)."""
    crossed: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d.assert_alive()
        for pid, _ in common.startfile_lines(startfile):
            if pid in crossed:
                continue
            try:
                if psutil.Process(pid).memory_info().rss >= LIMIT:
                    crossed[pid] = time.time()
            except psutil.Error:
                continue
        stops = _leak_stops(_history(wd))
        stopped = {int(r["pid"]) for r in stops}
        if len(stops) >= cycles and stopped >= set(crossed):
            return crossed
        time.sleep(0.01)
    raise common.BenchError(f"fewer than {cycles} leak restarts within {timeout:g}s")


def _is_gone(rec: dict[str, Any]) -> bool:
    """The record that says a leaking run was killed and is gone: ``stopped`` with a
    leak reason, or (the history since the restart path was reworked) ``exited``
    with ``reason = "leak"``."""
    return rec.get("event") in ("stopped", "exited") and "leak" in str(rec.get("reason"))


def _leak_stops(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in history if _is_gone(r)]


def pair(history: list[dict[str, Any]], crossed: dict[int, float]) -> dict[str, Any]:
    """Each run (a ``started`` pid) with its own crossing, detection and kill.

    ``limit_exceeded`` carries the pid it measured; without one it belongs to
    the run whose ``started`` precedes it (records of one program are in order). A run we saw cross
    whose kill is not in the history is reported missing; a leak kill whose
    crossing we did not see (it crossed between two of our looks and was
    killed before we saw it) is counted as unobserved. Nothing is dropped
    silently.
    """
    runs: dict[int, dict[str, Any]] = {}
    current: int | None = None
    for rec in history:
        event = rec.get("event")
        if event == "started":
            current = int(rec["pid"])
            runs[current] = {}
        elif event == "limit_exceeded" and (pid := rec.get("pid", current)) is not None:
            runs.setdefault(int(pid), {}).setdefault("found", rec)
        elif _is_gone(rec):
            runs.setdefault(int(rec["pid"]), {}).setdefault("stopped", rec)
    pairs, missing, unobserved = [], [], []
    for pid, run in runs.items():
        t_cross = crossed.get(pid)
        if t_cross is None:
            if "stopped" in run:
                unobserved.append(pid)
            continue
        if "found" not in run or "stopped" not in run:
            missing.append({"pid": pid, "detected": "found" in run, "stopped": "stopped" in run})
            continue
        pairs.append((pid, _ts(run["found"]) - t_cross, _ts(run["stopped"]) - t_cross))
    missing += [{"pid": p, "detected": False, "stopped": False} for p in crossed if p not in runs]
    return {"pairs": pairs, "missing": missing, "unobserved": unobserved}


def measure(goapp: Path, wd: Path, interval: float, sustain: int, cycles: int) -> dict[str, Any]:
    startfile = wd / "leak.starts"
    argv = (
        str(goapp),
        "-name",
        "leak",
        "-leak-heap",
        str(LEAK_PER_S),
        "-startfile",
        str(startfile),
    )
    timeout = cycles * (LIMIT / LEAK_PER_S + interval * sustain + 10) + 60
    with LeakDriver(wd, [drivers.Program("leak", argv)], interval, sustain) as d:
        crossed = _watch(startfile, wd, cycles, timeout, d)
        history = _history(wd)
    paired = pair(history, crossed)
    detect = [found for _, found, _ in paired["pairs"]]
    kill = [stopped for _, _, stopped in paired["pairs"]]
    bound = interval * sustain
    return {
        "interval_s": interval,
        "sustain": sustain,
        "bound_s": bound,
        "cycles": len(detect),
        "crossings_seen": len(crossed),
        "missing": paired["missing"],
        "unobserved_kills": len(paired["unobserved"]),
        "detect_s": [round(x, 3) for x in detect],
        "stopped_s": [round(x, 3) for x in kill],
        "detect": common.describe(detect),
        "stopped": common.describe(kill),
        "within_bound": sum(1 for x in detect if x <= bound + SLACK),
        "leftovers": d.leftovers,
    }


def build(results: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    rows, targets = [], []
    for r in results:
        if "error" in r:
            rows.append([r["interval_s"], r["sustain"], *[None] * 7, r["error"]])
            targets.append({"target": _target(r), "measured": "-", "met": None})
            continue
        dt, st = r["detect"], r["stopped"]
        ok = f"{r['within_bound']}/{r['cycles']}"
        rows.append([
            r["interval_s"], r["sustain"], r["bound_s"], dt.get("p50"), dt.get("max"),
            st.get("max"), ok, len(r["missing"]), r["unobserved_kills"], "",
        ])  # fmt: skip
        met = r["cycles"] > 0 and r["within_bound"] == r["cycles"] and not r["missing"]
        measured = f"max {dt.get('max', 0):.2f} s over {r['cycles']} leaks"
        if r["missing"]:
            measured += f", {len(r['missing'])} crossing(s) never acted on"
        targets.append({"target": _target(r), "measured": measured, "met": met})
    cols = ["interval s", "sustain", "bound s", "detect p50 s", "detect max s", "stopped max s"]
    cols += ["within bound", "missing", "unobserved", "error"]
    title = f"Leak detection: RSS limit {LIMIT // common.MiB} MiB crossed -> gosup acts"
    return common.table(title, cols, rows), targets


def _target(r: dict[str, Any]) -> str:
    return f"detected within interval x sustain ({r['interval_s']:g}s x {r['sustain']})"


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, help="leaks per config (default 5, --quick 2)")
    args = p.parse_args()
    cycles = args.cycles or (2 if args.quick else 5)
    configs = CONFIGS[:1] if args.quick else CONFIGS
    goapp = common.goapp()
    info = drivers.availability(["gosup"])
    results = []
    for interval, sustain in configs:
        common.log(f"gosup: {cycles} leaks, interval {interval:g}s, sustain {sustain}")
        with common.workdir("leak", args.keep) as wd:
            try:
                results.append(measure(goapp, wd, interval, sustain, cycles))
            except common.BenchError as exc:
                results.append({"interval_s": interval, "sustain": sustain, "error": str(exc)})
    tab, targets = build(results)
    common.print_tables([tab])
    params = {"limit_bytes": LIMIT, "leak_bytes_per_s": LEAK_PER_S, "cycles": cycles}
    data = {"params": params, "versions": info, "results": results, "targets": targets}
    common.write_result(NAME, args.quick, {**data, "tables": [tab]})


if __name__ == "__main__":
    main()
