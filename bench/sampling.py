"""Sampling: what gosup's resource sampler costs gosup itself.

N idle goapp programs (each serving /metrics on its own loopback port) under
one gosup, measured over a window after every child is up and a settle
period has passed: gosup's own CPU seconds per minute (user + system, the
children excluded). The same programs, four ways:

- ``off``: GOSUP_SAMPLING=0 in gosup's environment (no sampler at all);
- ``status``: no [limits] section; every program is still sampled every 5 s
  (rss, fds, threads) for status and metrics;
- ``limits``: [limits] with rss/open_fds/threads/connections, interval 5 s;
- ``limits+go``: the same plus go_metrics (a Prometheus scrape per sample).

The sampler's cost is a mode's CPU minus ``off``'s. At the end the status is
read once to check that every program really was sampled (and scraped).

    python bench/sampling.py [--quick] [--counts 50,200] [--duration 60]
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import common
import drivers
from drivers import gosup as gosup_driver

NAME = "sampling"
MODES = ("off", "status", "limits", "limits+go")
TARGET_50 = "50 programs sampled every 5 s: <= 0.25 CPU-s/min"
TARGET_200 = "200 programs: gosup well inside one core (<= 6 CPU-s/min, 10%)"


class SamplingDriver(gosup_driver.GosupDriver):
    """gosup with goapp programs on their own ports and a [limits] section per mode."""

    def __init__(self, wd: Path, progs: list[drivers.Program], mode: str, ports: list[int]):
        super().__init__(wd, progs, drivers.Settings())
        self.mode, self.ports = mode, dict(zip((p.name for p in progs), ports, strict=True))

    def env(self) -> dict[str, str]:
        extra = {"GOSUP_SAMPLING": "0"} if self.mode == "off" else {}
        return common.bench_env(self.tag, **extra)

    def _program(self, name: str, argv: tuple[str, ...]) -> list[str]:
        lines = super()._program(name, argv)
        if self.mode in ("off", "status"):
            return lines
        lines += ["", f"[programs.{name}.limits]", 'interval = "5s"', 'rss = "8GiB"']
        lines += ["open_fds = 100000", "threads = 100000", "connections = 100000"]
        if self.mode == "limits+go":
            lines += [f'go_metrics = "http://127.0.0.1:{self.ports[name]}/metrics"']
        return lines


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def measure(
    goapp: Path, wd: Path, n: int, mode: str, duration: float, settle: float
) -> dict[str, Any]:
    ports = free_ports(n)
    progs = [
        drivers.Program(
            f"p{i:03d}", (str(goapp), "-name", f"p{i:03d}", "-http", f"127.0.0.1:{port}")
        )
        for i, port in enumerate(ports)
    ]
    with SamplingDriver(wd, progs, mode, ports) as d:
        before = d.wait_children(n, timeout=max(120.0, 1.5 * n))
        time.sleep(settle)
        pids = d.supervisor_pids()
        c0, t0 = common.cpu_seconds(pids), time.monotonic()
        while (left := t0 + duration - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            d.assert_alive()
        cpu = (common.cpu_seconds(pids) - c0) / (time.monotonic() - t0) * 60
        status = _status(d)
        after = d.child_pids()
    sampled = [p for p in status if p.get("rss_bytes") is not None]
    return {
        "programs": n,
        "mode": mode,
        "cpu_s_per_min": round(cpu, 4),
        "sampled": len(sampled),
        "scraped": sum(1 for p in status if p.get("goroutines") is not None),
        "scrape_errors": sum(1 for p in status if p.get("scrape_error")),
        "max_sample_age_s": max((p.get("last_sample_age_s") or 0 for p in sampled), default=None),
        "children_restarted": sum(1 for k, v in before.items() if after.get(k) != v),
        "leftovers": d.leftovers,
    }


def _status(d: drivers.Driver) -> list[dict[str, Any]]:
    run = subprocess.run(
        [*d.ctl_command(), "status", "--json"], cwd=d.dir, env=d.env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if run.returncode != 0:
        raise common.BenchError(f"gosup status failed: {run.stderr[-500:]}")
    programs: list[dict[str, Any]] = json.loads(run.stdout)["programs"]
    return programs


def judge(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    def cost(n: str, mode: str) -> float | None:
        on, off = results.get(n, {}).get(mode, {}), results.get(n, {}).get("off", {})
        if "cpu_s_per_min" not in on or "cpu_s_per_min" not in off:
            return None
        return float(on["cpu_s_per_min"]) - float(off["cpu_s_per_min"])

    targets = []
    c50 = cost("50", "limits+go")
    targets.append({
        "target": TARGET_50,
        "measured": "-" if c50 is None else f"{c50:.3f} CPU-s/min (limits+go minus off)",
        "met": None if c50 is None else c50 <= 0.25,
    })  # fmt: skip
    top = results.get("200", {}).get("limits+go", {}).get("cpu_s_per_min")
    targets.append({
        "target": TARGET_200,
        "measured": "-" if top is None else f"{top:.3f} CPU-s/min (limits+go, all of gosup)",
        "met": None if top is None else top <= 6.0,
    })  # fmt: skip
    return targets


def main() -> int:
    p = common.parser(__doc__ or NAME)
    p.add_argument("--counts", default=None, help="program counts (default 50,200; quick 20)")
    p.add_argument("--duration", type=float, default=None, help="window seconds (default 60)")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    args = p.parse_args()
    counts = [int(c) for c in (args.counts or ("20" if args.quick else "50,200")).split(",")]
    duration = args.duration or (10.0 if args.quick else 60.0)
    settle = 3.0 if args.quick else 10.0
    modes = [m for m in args.modes.split(",") if m]
    goapp = common.goapp()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for n in counts:
        for mode in modes:
            common.log(f"sampling: {n} programs, {mode}, {duration:g}s window")
            with common.workdir(f"sampling-{n}-{mode}", args.keep) as wd:
                try:
                    res = measure(goapp, wd, n, mode, duration, settle)
                except common.BenchError as exc:
                    res = {"programs": n, "mode": mode, "error": str(exc)}
            results.setdefault(str(n), {})[mode] = res
    rows = []
    for n, by_mode in results.items():
        off = by_mode.get("off", {}).get("cpu_s_per_min")
        for mode, res in by_mode.items():
            cpu = res.get("cpu_s_per_min")
            delta = None if cpu is None or off is None else round(cpu - off, 4)
            rows.append([
                n, mode, cpu, delta, res.get("sampled"), res.get("scraped"),
                res.get("scrape_errors"), res.get("children_restarted"), res.get("error", ""),
            ])  # fmt: skip
    tab = common.table(
        f"gosup's own CPU with its resource sampler ({duration:g} s window)",
        ["programs", "mode", "CPU-s/min", "minus off", "sampled", "scraped", "scrape errors",
         "restarted", "error"],
        rows,
    )  # fmt: skip
    targets = judge(results)
    common.print_tables([tab])
    for t in targets:
        print(f"{t['target']}: {t['measured']} -> {t['met']}")
    params = {"counts": counts, "duration_s": duration, "settle_s": settle, "modes": modes}
    common.write_result(
        NAME,
        args.quick,
        {"params": params, "results": results, "tables": [tab], "targets": targets},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
