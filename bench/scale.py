"""Scale: 1,000 programs under one supervisor, beside supervisord and PM2.

Each supervisor in turn runs N idle goapp programs (1,000; ``--quick``: 50),
with its defaults plus only what every benchmark needs (captured stdout), and
we measure:

- start: from launching the supervisor to every child alive (found in its
  process tree; the same test for everyone), and to every program RUNNING by
  its own account (gosup's status, supervisorctl status, pm2 jlist "online");
- idle: the supervisor's own CPU-s/min and RSS over a window after a settle
  (the children excluded), as in bench/overhead.py. gosup as shipped samples
  every program every 5 s (status and metrics); "gosup-limits" adds a
  [limits] section (interval 5 s) to every program: sampling for limits at
  1,000 programs must stay within 5% of one core (3 CPU-s/min);
- status: wall time of the status command an operator types (``gosup
  status``, ``supervisorctl status``, ``pm2 ls``), the median of several
  (gosup's bytecode compiled first, as an install has it: bench/status_cli.py);
- reload: one program's environment changes in the config file, then the
  reload command (``gosup reload``; supervisord: ``supervisorctl update``),
  ``--runs`` times, each changing it again (the median is reported);
  timed from just before the command to (a) the command's return (the reply)
  and (b) the changed program's new process stamping its start (applied);
  for gosup, "applied" split into stages by its history records (``STAGES``:
  the command until ``supervisor_reloaded``, the stop until ``exited``, the
  restart until ``started``, the exec until the start stamp).
  PM2 has no "apply the difference of the config file" command, so no reload
  is measured for it.

PM2 is run when selected; if ``pm2 start`` of N apps does not finish within
the driver's bound, its row says so.

    python bench/scale.py [--quick] [--programs N] [--duration S] [--supervisors ...]
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import drivers
from drivers import _install

NAME = "scale"
CHANGED = "changed"  # the one program a reload changes
VARIANTS = {"gosup": drivers.Settings(), "gosup-limits": drivers.Settings(sampling=True)}
T_STATUS_MS, T_RELOAD_MS, T_SAMPLING = 150.0, 100.0, 3.0  # 3 CPU-s/min = 5% of a core


def programs(goapp: Path, wd: Path, n: int) -> list[drivers.Program]:
    progs = [drivers.Program(f"p{i:04d}", (str(goapp), "-name", f"p{i:04d}")) for i in range(n - 1)]
    stamp = (str(goapp), "-name", CHANGED, "-startfile", str(wd / "changed.starts"))
    return [*progs, drivers.Program(CHANGED, stamp)]


def _run(d: drivers.Driver, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # The operator's command as installed: gosup's bytecode compiled (main()),
    # as pip compiles supervisorctl's; PYTHONDONTWRITEBYTECODE would otherwise
    # make every gosup command compile its modules again (bench/status_cli.py).
    env = d.env()
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return subprocess.run([*d.ctl_command(), *args], cwd=d.dir, env=env, text=True,
                          capture_output=True, timeout=timeout)  # fmt: skip


def all_running(kind: str, d: drivers.Driver, n: int) -> bool:
    """Every program RUNNING (online) by the supervisor's own account."""
    if kind == "gosup":
        run = _run(d, "status", "--json")
        progs = json.loads(run.stdout)["programs"] if run.returncode == 0 else []
        return len(progs) == n and all(p["state"] == "RUNNING" for p in progs)
    if kind == "supervisord":
        lines = _run(d, "status").stdout.splitlines()
        return len(lines) == n and all(ln.split()[1:2] == ["RUNNING"] for ln in lines)
    run = _run(d, "jlist")
    try:
        apps = json.loads(run.stdout)
    except ValueError:
        return False
    return len(apps) == n and all(a["pm2_env"]["status"] == "online" for a in apps)


def status_ms(kind: str, d: drivers.Driver, runs: int) -> dict[str, float]:
    args = ["ls"] if kind == "pm2" else ["status"]
    times = []
    for i in range(runs + 1):  # the first one warms the page cache
        t0 = time.perf_counter()
        run = _run(d, *args)
        if run.returncode != 0 and kind != "supervisord":  # supervisorctl: 3 if one is not RUNNING
            raise common.BenchError(f"{kind} status exited {run.returncode}: {run.stderr[-300:]}")
        if i:
            times.append((time.perf_counter() - t0) * 1000)
    return common.describe(times)


def reload(kind: str, d: drivers.Driver, wd: Path, runs: int) -> dict[str, Any]:
    """``runs`` reloads, each changing CHANGED's environment again: the median
    (the stages of the median one for gosup) and every applied figure."""
    if kind == "pm2":
        return {"note": "pm2 has no apply-the-config-difference command"}
    done = []
    for i in range(runs):
        done.append(reload_once(kind, d, wd, i))
        time.sleep(1.5)  # the new process settles (supervisord: startsecs) before the next
    done.sort(key=lambda r: r["applied_ms"])
    median = done[len(done) // 2]
    return {**median, "applied_all_ms": [r["applied_ms"] for r in done],
            "reply_all_ms": sorted(r["reply_ms"] for r in done)}  # fmt: skip


def reload_once(kind: str, d: drivers.Driver, wd: Path, i: int) -> dict[str, Any]:
    """Change CHANGED's environment in the config file, apply it, time both ends."""
    if kind == "gosup":
        path, header = d.dir / "app.toml", f"[programs.{CHANGED}]\n"
        line, argv = 'environment = {{ BENCH_RELOAD = "{}" }}\n', ["reload"]
    else:
        path, header = d.dir / "supervisord.conf", f"[program:{CHANGED}]\n"
        line, argv = 'environment = BENCH_RELOAD="{}"\n', ["update"]
    startfile = wd / "changed.starts"
    seen = len(common.startfile_lines(startfile))
    text = path.read_text()
    old = header + (line.format(i - 1) if i else "")
    path.write_text(text.replace(old, header + line.format(i), 1))
    t0 = time.time_ns()
    run = _run(d, *argv)
    reply_ms = (time.time_ns() - t0) / 1e6
    if run.returncode != 0:
        raise common.BenchError(f"{kind} {argv[0]} exited {run.returncode}: {run.stderr[-300:]}")
    _, start_ns = common.wait_for(
        lambda: (common.startfile_lines(startfile)[seen:] or [None])[0], 120, "the changed program"
    )
    out = {"reply_ms": round(reply_ms, 1), "applied_ms": round((start_ns - t0) / 1e6, 1),
           "output": run.stdout.strip()[-200:]}  # fmt: skip
    if kind == "gosup":
        out["stages_ms"] = reload_stages(d.dir / ".gosup" / "history.jsonl", t0, start_ns)
    return out


# A gosup reload's stages, from its history (millisecond stamps) between the
# command and the new process's start stamp: what bounds "applied".
STAGES = (
    ("command", "supervisor_reloaded"),  # the CLI's start, app.toml read and checked, the diff
    ("stop", "exited"),  # stopping (the tree walk, the signal) until the old one is gone
    ("restart", "started"),  # stopped -> the new Program, its spawn
    ("exec", None),  # started -> goapp's own start stamp
)


def _ts_ns(ts: str) -> int:
    """A history stamp (RFC 3339 UTC, milliseconds) as unix nanoseconds."""
    return (
        round(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000)
        * 1_000_000
    )


def reload_stages(history: Path, t0: int, stamp_ns: int) -> dict[str, float]:
    """Milliseconds per stage (``STAGES``) of the reload begun at ``t0``."""
    marks: dict[str, int] = {}
    for line in history.read_text().splitlines():
        rec = json.loads(line)
        at = _ts_ns(rec["ts"])
        if at < t0 - 1_000_000:  # stamps are whole milliseconds
            continue
        if rec["event"] == "supervisor_reloaded" or rec.get("program") == CHANGED:
            marks.setdefault(rec["event"], at)
    out, prev = {}, t0
    for stage, event in STAGES:
        at = stamp_ns if event is None else marks.get(event)
        if at is None:
            continue
        out[stage] = round((at - prev) / 1e6, 1)
        prev = at
    return out


def measure(variant: str, goapp: Path, wd: Path, n: int, args: Any) -> dict[str, Any]:
    kind = "gosup" if variant in VARIANTS else variant
    settings = VARIANTS.get(variant, drivers.Settings())
    t0 = time.monotonic()
    with drivers.make(kind, wd, programs(goapp, wd, n), settings) as d:
        d.wait_children(n, timeout=max(300.0, 1.5 * n))
        alive_s = time.monotonic() - t0
        common.wait_for(lambda: all_running(kind, d, n), max(300.0, 1.5 * n), "all RUNNING", 0.5)
        running_s = time.monotonic() - t0
        time.sleep(args.settle)
        pids = d.supervisor_pids()
        c0, w0 = common.cpu_seconds(pids), time.monotonic()
        rss = [common.rss_bytes(pids)]
        while (left := w0 + args.duration - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            d.assert_alive()
            rss.append(common.rss_bytes(pids))
        cpu = (common.cpu_seconds(pids) - c0) / (time.monotonic() - w0) * 60
        status = status_ms(kind, d, args.runs)
        rel = reload(kind, d, wd, args.runs) if variant != "gosup-limits" else {}
    return {
        "programs": n,
        "alive_s": round(alive_s, 2),
        "running_s": round(running_s, 2),
        "cpu_s_per_min": round(cpu, 4),
        "rss_mib": round(max(rss) / common.MiB, 1),
        "status_ms": status,
        "reload": rel,
        "leftovers": d.leftovers,
    }


def report(results: dict[str, dict[str, Any]], n: int) -> tuple[list[Any], list[Any]]:
    ref = results.get("supervisord", {})
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append([name, *[None] * 9, r["error"][:200]])
            continue
        rel = r["reload"]
        rows.append([
            name, r["alive_s"], r["running_s"], f"{r['cpu_s_per_min']:.3f}", r["rss_mib"],
            common.ratio(r["cpu_s_per_min"], ref.get("cpu_s_per_min")),
            common.ratio(r["rss_mib"], ref.get("rss_mib")), r["status_ms"].get("p50"),
            rel.get("reply_ms"), rel.get("applied_ms"), rel.get("note", ""),
        ])  # fmt: skip
    cols = ["supervisor", "all alive s", "all RUNNING s", "idle CPU-s/min", "RSS MiB",
            "CPU x sd", "RSS x sd", "status p50 ms", "reload reply ms", "reload applied ms",
            "note"]  # fmt: skip
    tab = common.table(f"{n} idle programs (sd = supervisord, same run)", cols, rows)
    g, lim = results.get("gosup", {}), results.get("gosup-limits", {})
    st = g.get("status_ms", {}).get("p50")
    applied = g.get("reload", {}).get("applied_ms")
    cpu = lim.get("cpu_s_per_min")
    targets = [
        {"target": f"{n} programs: gosup status p50 <= 150 ms",
         "measured": "-" if st is None else f"{st:.0f} ms",
         "met": None if st is None else st <= T_STATUS_MS},
        {"target": f"{n} programs: a reload changing one program applied <= 100 ms "
                   "(gosup reload -> its new process's start stamp)",
         "measured": "-" if applied is None else
         f"{applied:.0f} ms (reply {g['reload']['reply_ms']:.0f} ms; "
         + ", ".join(f"{k} {v:.0f}" for k, v in g["reload"].get("stages_ms", {}).items()) + ")",
         "met": None if applied is None else applied <= T_RELOAD_MS},
        {"target": f"{n} programs sampled every 5 s ([limits]): <= 5% of one core",
         "measured": "-" if cpu is None else f"{cpu:.2f} CPU-s/min = {cpu / 0.6:.1f}% of a core",
         "met": None if cpu is None else cpu <= T_SAMPLING},
    ]  # fmt: skip
    return [tab], targets


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.set_defaults(supervisors="gosup,supervisord,pm2")
    p.add_argument("--programs", type=int, help="programs (default 1000, --quick 50)")
    p.add_argument("--duration", type=float, help="idle window seconds (default 60, quick 10)")
    p.add_argument("--runs", type=int, help="status commands timed (default 10, quick 5)")
    args = p.parse_args()
    n = args.programs or (50 if args.quick else 1000)
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    args.settle = 3.0 if args.quick else 10.0
    args.runs = args.runs or (5 if args.quick else 10)
    names = common.selected(args)
    variants = [v for s in names for v in (list(VARIANTS) if s == "gosup" else [s])]
    goapp = common.goapp()
    info = drivers.availability(names)
    if "gosup" in names:
        _install.compile_gosup()
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        kind = "gosup" if variant in VARIANTS else variant
        if not info[kind]["ok"]:
            results[variant] = {"error": f"skipped: {info[kind]['reason']}"}
            continue
        common.log(f"{variant}: {n} programs")
        started = time.monotonic()
        with common.workdir(f"scale-{variant}", args.keep) as wd:
            try:
                results[variant] = measure(variant, goapp, wd, n, args)
            except common.BenchError as exc:
                results[variant] = {"error": str(exc)}
        results[variant]["bench_s"] = round(time.monotonic() - started, 1)
    tabs, targets = report(results, n)
    common.print_tables(tabs)
    for t in targets:
        print(f"{t['target']}: {t['measured']} -> {t['met']}")
    params = {"programs": n, "duration_s": args.duration, "settle_s": args.settle,
              "status_runs": args.runs}  # fmt: skip
    data = {"params": params, "versions": info, "results": results, "targets": targets}
    common.write_result(NAME, args.quick, {**data, "tables": tabs})


if __name__ == "__main__":
    main()
