"""Log capture: one program writes 200 MB of 100-byte lines to stdout
(goapp -mode flood); MB/s until all of it is in the supervisor's log file,
and the supervisor's CPU meanwhile.

goapp stamps its start into -startfile and floods after -after, so the clock
starts at (start stamp + after) and stops when the log file holds the last
line. The supervisor's CPU baseline is taken in that pause, before the first
byte. "direct" is goapp writing straight into a file: the ceiling, its clock
stopped the same way (the last line seen in the file by the same poll). Each is
run several times, round robin; the table shows the median run.

    python bench/log_capture.py [--quick] [--mb 200]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import drivers
import profiling

NAME = "log_capture"
AFTER = 2.0  # seconds between goapp's start and its first flood byte


def flood_argv(goapp: Path, nbytes: int, startfile: Path) -> tuple[str, ...]:
    return (
        str(goapp), "-name", "flood", "-mode", "flood", "-flood-bytes", str(nbytes),
        "-after", f"{AFTER}s", "-startfile", str(startfile),
    )  # fmt: skip


def _complete(log: Path, nbytes: int) -> bool:
    """The log holds at least nbytes and ends with goapp's last flood line."""
    try:
        size = log.stat().st_size
    except FileNotFoundError:
        return False
    if size < nbytes:
        return False
    last = f"flood {math.ceil(nbytes / 100):012d} ".encode()
    with open(log, "rb") as f:
        f.seek(max(0, size - 300))
        return last in f.read()


STALL = 15.0  # seconds without growth before a log counts as incomplete for good


def _wait_complete(log: Path, nbytes: int, name: str) -> None:
    """Wait until the log is complete; BenchError once it stops growing short of it
    (a supervisor that drops output never completes: no point waiting minutes)."""
    last_size, last_change = -1, time.monotonic()
    delay = 0.001  # 1 ms polls (a stat each): the whole flood can take well under a second
    while not _complete(log, nbytes):
        size = log.stat().st_size if log.exists() else 0
        now = time.monotonic()
        if size != last_size:
            last_size, last_change = size, now
        elif now - last_change > STALL:
            lost = nbytes - size
            raise common.BenchError(
                f"{name}: the log stopped growing at {size} bytes, {lost} short of the flood"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def _expected_size(pid: int, nbytes: int) -> int:
    return nbytes + len(f"start: name=flood pid={pid}\n") + len("ready\n")


def measure(name: str, goapp: Path, wd: Path, nbytes: int, spy: Path | None) -> dict[str, Any]:
    startfile = wd / "flood.starts"
    prog = drivers.Program("flood", flood_argv(goapp, nbytes, startfile))
    with drivers.make(name, wd, [prog], drivers.Settings(oneshot=True)) as d:
        pid, start_ns = common.wait_for(
            lambda: next(iter(common.startfile_lines(startfile)), None), 120, f"{name}: start"
        )
        pids = d.supervisor_pids()
        c0 = common.cpu_seconds(pids)
        flood_ns = start_ns + int(AFTER * 1e9)
        late = time.time_ns() > flood_ns
        log = d.log_path("flood")
        spied = pids[0] if spy is not None and name == "gosup" else None
        with profiling.profiled(spied, spy or wd / "none", spied is not None) as hot:
            _wait_complete(log, nbytes, name)
        end_ns = time.time_ns()
        cpu = common.cpu_seconds(pids) - c0
        size = log.stat().st_size
    elapsed = (end_ns - flood_ns) / 1e9
    result: dict[str, Any] = {
        "mb_per_s": round(nbytes / 1e6 / elapsed, 2),
        "seconds": round(elapsed, 3),
        "cpu_s": round(cpu, 3),
        "cpu_pct": round(100 * cpu / elapsed, 1),
        "log_bytes": size,
        "expected_bytes": _expected_size(pid, nbytes),
        "bytes_ok": size == _expected_size(pid, nbytes),
        "baseline_late": late,
        "leftovers": d.leftovers,
    }
    if hot:
        result["profile"] = hot
    return result


def measure_direct(goapp: Path, wd: Path, nbytes: int) -> dict[str, Any]:
    """goapp's stdout straight into a file: what the disk and the writer allow.

    The clock stops where the supervisors' does: when our poll sees the last
    line in the file (`_wait_complete`, the same poll), not when the writer
    exits, so the ceiling carries the same observation delay as everyone.
    """
    startfile = wd / "flood.starts"
    log = wd / "direct.log"
    tag = common.new_tag()
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                flood_argv(goapp, nbytes, startfile),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
                env=common.bench_env(tag),
                start_new_session=True,
            )
        pid, start_ns = common.wait_for(
            lambda: next(iter(common.startfile_lines(startfile)), None), 120, "direct: start"
        )
        _wait_complete(log, nbytes, "direct")
        end_ns = time.time_ns()
        proc.wait(max(120.0, nbytes / 1e6 * 3))
    finally:
        common.sweep(tag)
    elapsed = (end_ns - start_ns) / 1e9 - AFTER
    size = log.stat().st_size
    return {
        "mb_per_s": round(nbytes / 1e6 / elapsed, 2),
        "seconds": round(elapsed, 3),
        "log_bytes": size,
        "bytes_ok": size == _expected_size(pid, nbytes),
    }


def build_table(
    results: dict[str, Any], info: dict[str, Any], mb: int, reps: int
) -> dict[str, Any]:
    ref = results.get("supervisord", {}).get("mb_per_s")
    rows = []
    for name, res in results.items():
        version = info.get(name, {}).get("version", "-")
        if "mb_per_s" not in res:
            rows.append([name, version, None, None, None, None, None, None, res.get("error")])
            continue
        rows.append([
            name, version, res["mb_per_s"], common.ratio(res["mb_per_s"], ref), res["seconds"],
            res.get("cpu_s"), res.get("cpu_pct"), res["bytes_ok"], "",
        ])  # fmt: skip
    cols = ["supervisor", "version", "MB/s", "x supervisord", "seconds", "CPU s", "CPU %"]
    cols += ["all bytes", "note"]
    title = f"Log capture ({mb} MB of 100-byte lines; median of {reps} runs each)"
    return common.table(title, cols, rows)


def one_rep(name: str, goapp: Path, nbytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """One flood through ``name`` (or straight into a file for "direct")."""
    spy = common.RESULTS / f"profile-{NAME}.txt" if args.profile else None
    with common.workdir(name, args.keep) as wd:
        try:
            if name == "direct":
                return measure_direct(goapp, wd, nbytes)
            return measure(name, goapp, wd, nbytes, spy)
        except common.BenchError as exc:
            return {"error": str(exc)}


def median_of(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median MB/s (its other figures with it), plus all MB/s."""
    good = sorted((r for r in reps if "mb_per_s" in r), key=lambda r: r["mb_per_s"])
    if not good:
        return reps[-1]
    mid = dict(good[(len(good) - 1) // 2])
    mid["reps_mb_per_s"] = [r["mb_per_s"] for r in good]
    mid["reps_bytes_ok"] = [r["bytes_ok"] for r in good]
    mid["bytes_ok"] = all(r["bytes_ok"] for r in good) and len(good) == len(reps)
    return mid


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, help="megabytes written (default 200, --quick 50)")
    p.add_argument("--reps", type=int, help="floods per supervisor (default 3, --quick 2)")
    args = p.parse_args()
    mb = args.mb or (50 if args.quick else 200)
    reps = args.reps or (2 if args.quick else 3)
    nbytes = mb * 1_000_000
    names = common.selected(args)
    goapp = common.goapp()
    info = drivers.availability(names)
    usable = ["direct", *(n for n in names if info[n]["ok"])]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in usable}
    # Round robin, so a change in the machine's load touches every supervisor alike.
    for rep in range(reps):
        for name in usable:
            common.log(f"{name}: {mb} MB ({rep + 1}/{reps})")
            runs[name].append(one_rep(name, goapp, nbytes, args))
    results: dict[str, Any] = {n: median_of(r) for n, r in runs.items()}
    for name in names:
        if not info[name]["ok"]:
            results[name] = {"error": f"skipped: {info[name]['reason']}"}
    tab = build_table(results, info, mb, reps)
    common.print_tables([tab])
    params = {"megabytes": mb, "line_bytes": 100, "reps": reps}
    data = {"params": params, "versions": info, "results": results}
    common.write_result(NAME, args.quick, {**data, "tables": [tab]})


if __name__ == "__main__":
    main()
