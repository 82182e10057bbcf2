"""gosup's targets, judged from the result JSON of one run, and the measured
part of docs/benchmarks.md rendered from the same JSON.

A bench script can declare its own targets in its JSON (``"targets": [{"target":
..., "measured": ..., "met": true|false|null}]``); they are folded in as they
are. The targets of issue 8 for the harness's own benchmarks (and for the
config swap and status CLI benchmarks, when they declare none) are judged here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import common

Row = dict[str, Any]
T_FLOOR = "p50 <= 2x floor"
T_BELOW = "p50 below every incumbent"
T_LOG = ">= 1.2x supervisord MB/s"
LOG_RATIO = 1.2
T_CPU = "{n} programs, gosup as shipped: CPU-s/min <= supervisord's (same run)"
T_RSS = "{n} programs, gosup as shipped: RSS <= 1.0x supervisord's (same run)"
T_SAMPLING = "50 programs, limits set: CPU <= 0.25 s/min"
OVERHEAD_COUNTS = ("50", "200")
QUICK_NOTE = "--quick (a smoke run: short, on a busy machine; indicative only)"


def row(bench: str, target: str, measured: str, met: bool | None) -> Row:
    result = "not measured" if met is None else ("met" if met else "MISSED")
    return {
        "benchmark": bench,
        "target": target,
        "measured": measured,
        "met": met,
        "result": result,
    }


def _num(data: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) and not isinstance(data, bool) else None


def judge(bench: str, target: str, value: float | None, text: str, ok: bool) -> Row:
    """A target row; ``value`` None means it was not measured."""
    if value is None:
        return row(bench, target, "-", None)
    return row(bench, target, text, ok)


def restart(data: dict[str, Any] | None) -> list[Row]:
    """Both ways of restart_latency.py: tuned, and as shipped (each supervisor's
    defaults); each against the floor and the incumbents of the same run."""
    b = "restart_latency"
    res = (data or {}).get("results", {})
    floor = _num(res, "floor", "stats", "p50")
    rows: list[Row] = []
    for kind, label in (("tuned", "tuned"), ("defaults", "as shipped")):
        part = res.get(kind, res if kind == "tuned" and "tuned" not in res else {})
        t_floor, t_below = f"{label}: {T_FLOOR}", f"{label}: {T_BELOW}"
        gosup = _num(part, "gosup", "stats", "p50")
        if gosup is None or not floor:
            rows += [row(b, t_floor, "-", None), row(b, t_below, "-", None)]
            continue
        text = f"{gosup:.1f} ms = {gosup / floor:.2f}x floor ({floor:.1f} ms)"
        rows.append(row(b, t_floor, text, gosup <= 2 * floor))
        others = {n: _num(part, n, "stats", "p50") for n in part if n not in ("gosup", "floor")}
        measured = {n: v for n, v in others.items() if v is not None}
        text = ", ".join(f"{n} {v:.1f}" for n, v in measured.items()) or "no incumbent measured"
        met = all(gosup < v for v in measured.values()) if measured else None
        rows.append(row(b, t_below, f"gosup {gosup:.1f} vs {text} ms", met))
    return rows


def log_capture(data: dict[str, Any] | None) -> list[Row]:
    res = (data or {}).get("results", {})
    gosup, ref = _num(res, "gosup", "mb_per_s"), _num(res, "supervisord", "mb_per_s")
    value = gosup if gosup is not None and ref else None
    text = f"{gosup or 0:.0f} vs {ref or 0:.0f} MB/s = {(gosup or 0) / (ref or 1):.2f}x"
    met = value is not None and value >= LOG_RATIO * (ref or 0)
    return [judge("log_capture", T_LOG, value, text, met)]


def overhead(data: dict[str, Any] | None) -> list[Row]:
    """Issue 18: gosup as shipped (the defaults, sampling as it ships) against
    supervisord's default in the same run, CPU and RSS both as ratios; the
    variant with limits set keeps its own CPU bound."""
    b = "overhead"
    results = (data or {}).get("results", {})
    rows = []
    for n in OVERHEAD_COUNTS:
        res = results.get(n, {})
        for key, target, unit in (
            ("cpu_s_per_min", T_CPU, "CPU-s/min"),
            ("rss_mib", T_RSS, "MiB"),
        ):
            gosup, ref = _num(res, "gosup", key), _num(res, "supervisord", key)
            value = gosup if ref else None
            text = f"{gosup or 0:.3f} vs {ref or 0:.3f} {unit} = {(gosup or 0) / (ref or 1):.2f}x"
            ok = value is not None and ref is not None and value <= ref
            rows.append(judge(b, target.format(n=n), value, text, ok))
    on = _num(results.get("50", {}), "gosup-limits", "cpu_s_per_min")
    rows.append(judge(b, T_SAMPLING, on, f"{on or 0:.3f} CPU-s/min", on is not None and on <= 0.25))
    return rows


def _find(data: Any, want: Callable[[str], bool]) -> float | None:
    """The first number under a key ``want`` accepts, searching gosup's part first."""
    if not isinstance(data, dict):
        return None
    for key in ("gosup", "results", "stats"):
        if key in data and (found := _find(data[key], want)) is not None:
            return found
    for key, value in data.items():
        if want(key) and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def config_swap(data: dict[str, Any] | None) -> list[Row]:
    p99 = _find(data or {}, lambda k: k.lower() in ("p99_ms", "p99"))
    text = "-" if p99 is None else f"{p99:.1f} ms"
    return [row("config_swap", "p99 <= 50 ms", text, None if p99 is None else p99 <= 50)]


def status_cli(data: dict[str, Any] | None) -> list[Row]:
    res = (data or {}).get("results", {})
    median = _find(
        res.get("gosup", data or {}),
        lambda k: k.lower() in ("p50_ms", "median_ms", "p50", "median"),
    )
    ctl = None
    for name in ("supervisorctl", "supervisord"):
        if name in res:
            ctl = _find(res[name], lambda k: k.lower() in ("p50_ms", "median_ms", "p50", "median"))
            break
    rows = [row("status_cli", "median <= 100 ms", "-" if median is None else f"{median:.1f} ms",
                None if median is None else median <= 100)]  # fmt: skip
    if median is None or not ctl:
        rows.append(row("status_cli", "median <= 0.6x supervisorctl", "-", None))
    else:
        text = f"{median:.1f} vs {ctl:.1f} ms = {median / ctl:.2f}x"
        rows.append(row("status_cli", "median <= 0.6x supervisorctl", text, median <= 0.6 * ctl))
    bare = _num(res, "python -c pass", "stats", "p50")
    target = "median <= 1.5x python -c pass (same interpreter, same run)"
    if median is None or not bare:
        rows.append(row("status_cli", target, "-", None))
    else:
        text = f"{median:.1f} vs {bare:.1f} ms = {median / bare:.2f}x"
        rows.append(row("status_cli", target, text, median <= 1.5 * bare))
    return rows


T_ZD_PLANNED = "gosup sockets+overlap: 0 failed requests in every planned restart kind"
T_ZD_CRASH = "gosup sockets+overlap: 0 refused connections in crashes"
T_ZD_P99 = "gosup sockets+overlap: added p99 < 50 ms"
T_ZD_RATE = "at 1,000 requests/s"


def zero_downtime(data: dict[str, Any] | None) -> list[Row]:
    b = "zero_downtime"
    res = (data or {}).get("results", {}).get("gosup-overlap") or {}
    kinds = res.get("kinds") or {}
    measured = {k: v for k, v in kinds.items() if isinstance(v, dict) and "failed" in v}
    if not measured:
        return [row(b, t, "-", None) for t in (T_ZD_PLANNED, T_ZD_CRASH, T_ZD_P99, T_ZD_RATE)]
    planned = {k: v for k, v in measured.items() if k != "crash"}
    text = ", ".join(f"{k} {v['failed']}/{v['requests']}" for k, v in planned.items())
    rows = [row(b, T_ZD_PLANNED, text or "-", all(v["failed"] == 0 for v in planned.values()))]
    crash = measured.get("crash")
    rows.append(judge(b, T_ZD_CRASH, None if crash is None else float(crash["refused"]),
                      f"{(crash or {}).get('refused')} of {(crash or {}).get('requests')}",
                      crash is not None and crash["refused"] == 0))  # fmt: skip
    added = [v["added_p99_ms"] for v in measured.values() if v.get("added_p99_ms") is not None]
    worst = max(added) if added else None
    rows.append(judge(b, T_ZD_P99, worst, f"worst {worst} ms", worst is not None and worst < 50))
    rate = _num(res, "rate_reached")
    rows.append(
        judge(b, T_ZD_RATE, rate, f"{rate} req/s reached", rate is not None and rate >= 990)
    )
    return rows


JUDGES: dict[str, Callable[[dict[str, Any] | None], list[Row]]] = {
    "restart_latency": restart,
    "log_capture": log_capture,
    "overhead": overhead,
    "config_swap": config_swap,
    "status_cli": status_cli,
    "zero_downtime": zero_downtime,
}


def evaluate(results: dict[str, dict[str, Any]]) -> list[Row]:
    """Every target: declared ones as the script wrote them, the issue's ones judged here."""
    rows: list[Row] = []
    for name, fn in JUDGES.items():
        declared = (results.get(name) or {}).get("targets")
        rows += _declared(name, declared) if declared else fn(results.get(name))
    for name, data in results.items():
        if name not in JUDGES and isinstance(data.get("targets"), list):
            rows += _declared(name, data["targets"])
    return rows


def _declared(name: str, items: list[Any]) -> list[Row]:
    out = []
    for item in items:
        if isinstance(item, dict):
            met = item.get("met")
            out.append(row(name, str(item.get("target", "?")), str(item.get("measured", "-")),
                           met if isinstance(met, bool) else None))  # fmt: skip
    return out


# -- docs/benchmarks.md -------------------------------------------------------------


ORDER: tuple[str, ...] = ("restart_latency", "overhead", "log_capture", "config_swap")
ORDER += ("status_cli", "sampling", "leak_detection", "rebuild", "zero_downtime")
ORDER += ("loop_lag", "scale")


def markdown(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    """The generated part of docs/benchmarks.md."""
    benches = {n: r for n, r in results.items() if n not in ("setup", "summary")}
    ordered = sorted(benches, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    m: dict[str, Any] = next((r["machine"] for r in benches.values() if "machine" in r), {})
    finished = max((str(r.get("finished", "")) for r in benches.values()), default="?")
    quick = any(r.get("quick") for r in benches.values())
    lines = [
        "<!-- Generated by `bench/run.py --write-doc` from bench/results/*.json: do not edit. -->",
        "",
        "### Machine and run",
        "",
        "| | |",
        "|---|---|",
        f"| CPUs (nproc) | {m.get('nproc', '?')} |",
        f"| model name | {m.get('cpu_model', '?')} |",
        f"| memory | {m.get('memory_gib', '?')} GiB |",
        f"| kernel | {m.get('kernel', '?')} |",
        f"| Python | {m.get('python', '?')} |",
        f"| finished | {finished} |",
        f"| mode | {QUICK_NOTE if quick else 'full'} |",
        "",
        "Command: `.venv/bin/python bench/run.py"
        + (" --quick" if quick else "")
        + (f" --only {','.join(ordered)}" if set(ORDER) - set(ordered) else "")
        + " --write-doc`",
    ]
    missing = [n for n in ORDER if n not in benches]
    if missing:
        lines += [
            "",
            "Not in this run (no result file; their targets read 'not measured'): "
            + ", ".join(f"`{n}`" for n in missing)
            + ".",
        ]
    sections = [("Supervisors", results.get("setup", {})), ("Targets", summary)]
    sections += [(n.replace("_", " ").capitalize(), benches[n]) for n in ordered]
    for title, data in sections:
        lines += ["", f"### {title}", ""]
        tables = data.get("tables") or []
        if title == "Targets":
            tables = tables[:1]
        if "benchmark" in data and title not in ("Supervisors", "Targets"):
            mode = "--quick" if data.get("quick") else "full"
            source = f"bench/results/{data['benchmark']}.json"
            lines += [f"`{source}`, {mode}, finished {data.get('finished')}", ""]
        if not tables:
            lines.append(f"_(no table in the result JSON: {data.get('error', 'see the file')})_")
        for tab in tables:
            lines += [common.render_markdown(tab), ""]
    return "\n".join(lines).rstrip() + "\n"
