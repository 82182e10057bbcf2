"""Run every gosup benchmark beside supervisord, circus and PM2, in one go.

    .venv/bin/python bench/run.py [--quick] [--write-doc]

1. builds the goapp fixture and installs the incumbents into bench/.cache
   (an incumbent that cannot be installed is reported, with the reason);
2. runs each bench script present (``python bench/<name>.py [--quick]``) as a
   subprocess, each printing its table and writing bench/results/<name>.json;
3. folds the JSON into a summary: every target with met / missed
   (bench/results/summary.json);
4. with --write-doc, regenerates the measured part of docs/benchmarks.md from
   the JSON, so the page can never disagree with the results.

``--no-run --write-doc`` only regenerates the page from existing results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import common
import drivers
import targets

# Run in this order; scripts owned by other parts of the project run when present.
BENCHES = (
    "restart_latency",
    "overhead",
    "log_capture",
    "config_swap",
    "status_cli",
    "sampling",
    "leak_detection",
    "rebuild",
    "zero_downtime",
    "loop_lag",
    "scale",
)
# Scripts that also take --supervisors and --profile (the harness's own).
HARNESS = {"restart_latency", "overhead", "log_capture"}
DOC = common.ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:generated:begin -->", "<!-- bench:generated:end -->"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run of every benchmark")
    p.add_argument("--only", help="comma-separated benchmarks to run (default: all present)")
    p.add_argument("--supervisors", default=",".join(drivers.NAMES), help="subset to measure")
    p.add_argument("--profile", action="store_true", help="py-spy profile gosup while measured")
    p.add_argument("--write-doc", action="store_true", help="regenerate docs/benchmarks.md")
    p.add_argument("--no-run", action="store_true", help="run nothing; summarise existing JSON")
    return p.parse_args()


def setup(names: list[str]) -> dict[str, Any]:
    """Build the fixture, install the incumbents; report what is usable."""
    common.log("building goapp, installing incumbents into bench/.cache (first run: minutes)")
    goapp = common.goapp()
    info = drivers.availability(names)
    rows = [
        [n, i["version"] if i["ok"] else None, i["ok"], i["reason"] or ""] for n, i in info.items()
    ]
    tab = common.table("Supervisors", ["name", "version", "usable", "reason"], rows)
    common.print_tables([tab])
    data = {"goapp": str(goapp), "supervisors": info, "tables": [tab]}
    common.write_result("setup", False, data)
    return info


def run_script(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run bench/<name>.py, bounded in time; afterwards nothing it started survives."""
    argv = [sys.executable, str(common.BENCH / f"{name}.py")]
    argv += ["--quick"] if args.quick else []
    if name in HARNESS:
        argv += ["--supervisors", args.supervisors] + (["--profile"] if args.profile else [])
    timeout = 1200.0 if args.quick else 3600.0
    common.log(f"== {name}: {' '.join(argv[1:])}")
    # The previous script's files written back first: log capture leaves
    # gigabytes queued, and the next script's fsyncs (a config swap's) wait
    # behind them (20 swaps with 2.4 GB queued: p90 458 ms; after a sync 17).
    os.sync()
    started = time.time()
    run_tag = common.new_tag()
    env = dict(os.environ, **{common.RUN_VAR: run_tag})  # inherited by all it starts
    proc = subprocess.Popen(argv, cwd=common.ROOT, env=env, start_new_session=True)
    try:
        code = _wait(proc, timeout)
    finally:
        swept = common.sweep(run_tag, var=common.RUN_VAR)
    result = common.RESULTS / f"{name}.json"
    fresh = result.exists() and result.stat().st_mtime >= started
    status = "ok" if code == 0 and fresh else ("timeout" if code is None else f"exit {code}")
    if code == 0 and not fresh:
        status = "no result written"
    if swept:
        status += f" ({swept} leftover processes killed)"
    return {"status": status, "seconds": round(time.time() - started, 1)}


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The script's exit code; None after a timeout. A script that overruns (or us
    being interrupted) gets SIGINT first, so its own cleanup stops its supervisors."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _interrupt(proc)
        return None
    except KeyboardInterrupt:
        _interrupt(proc)
        raise


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        common.kill_group(proc)
        proc.wait()


def load_results() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(common.RESULTS.glob("*.json")):
        if path.stem == "summary":
            continue
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            out[path.stem] = {"error": f"unreadable: {exc}"}
    return out


def summarise(results: dict[str, dict[str, Any]], runs: dict[str, Any]) -> dict[str, Any]:
    rows = targets.evaluate(results)
    tab = common.table(
        "Targets for gosup (same run)",
        ["benchmark", "target", "measured", "result"],
        [[r["benchmark"], r["target"], r["measured"], r["result"]] for r in rows],
    )
    run_tab = common.table(
        "Benchmark scripts",
        ["script", "status", "seconds"],
        [[n, r["status"], r["seconds"]] for n, r in runs.items()],
    )
    summary = {"targets": rows, "runs": runs, "tables": [tab, run_tab]}
    if runs:
        common.write_result("summary", any(r.get("quick") for r in results.values()), summary)
    common.print_tables([run_tab, tab] if runs else [tab])
    return summary


def write_doc(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    """Replace the generated block of docs/benchmarks.md with tables from the JSON."""
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = targets.markdown(results, summary)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    common.log(f"wrote {DOC.relative_to(common.ROOT)}")


def main() -> int:
    args = parse_args()
    present = [b for b in BENCHES if (common.BENCH / f"{b}.py").exists()]
    chosen = present if not args.only else [b.strip() for b in args.only.split(",")]
    missing = [b for b in chosen if b not in present]
    if missing:
        raise SystemExit(f"no such benchmark script: {missing} (present: {present})")
    runs: dict[str, Any] = {}
    if not args.no_run:
        setup(common.selected(args))
        for name in chosen:
            runs[name] = run_script(name, args)
    results = load_results()
    summary = summarise(results, runs)
    if args.write_doc:
        write_doc(results, summary)
    failed = [n for n, r in runs.items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
