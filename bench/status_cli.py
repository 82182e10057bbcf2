"""`gosup status` beside `supervisorctl status`: wall time of the whole command,
as an operator feels it (interpreter start, imports, config, socket, output).

Both supervisors run at once with the same few idle goapp programs;
``gosup status`` (the installed console script) and ``supervisorctl status``
are then run alternately, ``--runs`` times each after a warm-up, so both see
the same machine load. The floor is the bare interpreter (``python -c pass``).
Bytecode is compiled first for gosup (pip did it for supervisor at install;
an editable install with PYTHONDONTWRITEBYTECODE set would otherwise
recompile gosup's modules on every run).

    python bench/status_cli.py [--quick] [--runs N]

Targets: gosup's median <= 100 ms and <= 0.6x supervisorctl's (issue 3), and
<= 1.5x the bare interpreter's (``python -c pass``, the same interpreter in
the same run: issue 18), so that what ``gosup status`` imports and reads is
all it costs beyond starting Python.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import drivers
from drivers import _install
from drivers.supervisord import SupervisordDriver

NAME = "status_cli"
PROGRAMS = 4
WARMUP = 3


def timed(argv: Sequence[str], cwd: Path, env: dict[str, str]) -> float:
    """Wall time of one run in ms; BenchError when the command fails."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    ms = (time.perf_counter() - t0) * 1000
    if done.returncode != 0:
        raise common.BenchError(f"{argv[0]} exited {done.returncode}: {done.stderr[-500:]}")
    return ms


def commands(gosup_dir: Path, ctl: list[str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv, env) of each command measured."""
    venv_bin = Path(_install.gosup_python()).parent
    tag = common.new_tag()
    env = common.bench_env(tag)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return {
        "gosup": ([str(venv_bin / "gosup"), "status"], env),
        "supervisorctl": ([*ctl, "status"], common.bench_env(tag, scrub_python=True)),
        "python -c pass": ([_install.gosup_python(), "-c", "pass"], env),
    }


def measure(goapp: Path, wd: Path, runs: int) -> dict[str, list[float]]:
    programs = [
        drivers.Program(f"idle{i}", (str(goapp), "-name", f"idle{i}")) for i in range(PROGRAMS)
    ]
    (wd / "gosup").mkdir()
    (wd / "supervisord").mkdir()
    with (
        drivers.make("gosup", wd / "gosup", programs, drivers.Settings()) as g,
        drivers.make("supervisord", wd / "supervisord", programs, drivers.Settings()) as s,
    ):
        assert isinstance(s, SupervisordDriver)
        g.wait_children(PROGRAMS, timeout=120)
        s.wait_children(PROGRAMS, timeout=120)
        cmds = commands(g.dir, s.ctl_command())
        # The gosup socket answers once every program is listed as RUNNING.
        common.wait_for(
            lambda: "STARTING" not in _output(cmds["gosup"], g.dir), 60, "gosup programs RUNNING"
        )
        common.wait_for(
            lambda: "STARTING" not in _output(cmds["supervisorctl"], s.dir), 60, "supervisord"
        )
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for i in range(WARMUP + runs):
            for name, (argv, env) in cmds.items():
                cwd = g.dir if name != "supervisorctl" else s.dir
                ms = timed(argv, cwd, env)
                if i >= WARMUP:
                    times[name].append(ms)
    return times


def _output(cmd: tuple[list[str], dict[str, str]], cwd: Path) -> str:
    argv, env = cmd
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return done.stdout if done.returncode == 0 else "STARTING (not answering yet)"


def report(times: dict[str, list[float]], info: dict[str, Any], runs: int) -> dict[str, Any]:
    stats = {name: common.describe(values) for name, values in times.items()}
    ctl = stats["supervisorctl"].get("p50")
    rows = [
        [
            name,
            st.get("p50"),
            st.get("p90"),
            st.get("max"),
            common.ratio(st.get("p50"), ctl),
            common.ratio(st.get("p50"), stats["python -c pass"].get("p50")),
        ]
        for name, st in stats.items()
    ]
    tab = common.table(
        f"status command wall time ({runs} runs each, {PROGRAMS} idle programs; "
        f"supervisor {info.get('supervisord', {}).get('version')})",
        ["command", "p50 ms", "p90 ms", "max ms", "p50 / supervisorctl", "p50 / python -c pass"],
        rows,
    )
    gosup = stats["gosup"]["p50"]
    bare = stats["python -c pass"]["p50"]
    targets = [
        {"target": "median <= 100 ms", "measured": f"{gosup:.1f} ms", "met": gosup <= 100},
        {
            "target": "median <= 0.6x supervisorctl",
            "measured": f"{gosup:.1f} vs {ctl:.1f} ms = {gosup / ctl:.2f}x",
            "met": gosup <= 0.6 * ctl,
        },
        {
            "target": "median <= 1.5x python -c pass (same interpreter, same run)",
            "measured": f"{gosup:.1f} vs {bare:.1f} ms = {gosup / bare:.2f}x",
            "met": gosup <= 1.5 * bare,
        },
    ]
    results = {
        name: {"times_ms": [round(v, 2) for v in values], "stats": stats[name]}
        for name, values in times.items()
    }
    return {"params": {"runs": runs, "programs": PROGRAMS}, "results": results,
            "targets": targets, "tables": [tab]}  # fmt: skip


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, help="runs of each command (default 30, --quick 5)")
    args = p.parse_args()
    runs = args.runs or (5 if args.quick else 30)
    goapp = common.goapp()
    info = drivers.availability(["gosup", "supervisord"])
    for name in ("gosup", "supervisord"):
        if not info[name]["ok"]:
            raise SystemExit(f"{name} is not usable: {info[name]['reason']}")
    _install.compile_gosup()
    with common.workdir(NAME, args.keep) as wd:
        common.log(f"gosup status vs supervisorctl status, {runs} runs each")
        data = report(measure(goapp, wd, runs), info, runs)
    common.print_tables(data["tables"])
    for t in data["targets"]:
        print(f"{t['target']}: {t['measured']} -> {'met' if t['met'] else 'MISSED'}")
    common.write_result(NAME, args.quick, {"versions": info, **data})


if __name__ == "__main__":
    main()
