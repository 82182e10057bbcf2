"""Where a restart's time goes (``restart_latency.py --breakdown``).

Two sources, both on CLOCK_MONOTONIC:

- the kernel: ``perf record`` of the ``sched_process_exit`` and
  ``sched_process_exec`` tracepoints, system-wide (root, and perf, needed):
  when the killed child was dead, when the replacement exec'd (the setpriv
  wrapper, then goapp);
- gosup itself: run through this file as its entry point (``python
  bench/restart_trace.py run app.toml``), it is gosup with two marks written
  to ``$GOSUP_BENCH_TRACE``: ``cb`` when the pidfd callback of a child's exit
  runs, ``popen PID`` when Popen is called. Nothing else changes (the marks
  cost a write each). The floor writes the same two marks itself.

With goapp's start stamp (wall clock, mapped onto the monotonic clock) and the
latency measured from the kill, each restart splits into: kill (SIGKILL sent
-> the process is dead), detection (dead -> the supervisor's code runs),
bookkeeping (-> Popen is called), fork/exec (-> goapp's exec; for gosup this
includes the setpriv wrapper's exec), Go start (exec -> the start stamp).

Where the bookkeeping goes: with ``GOSUP_BENCH_STAMPS=1`` in the environment
(and ``--keep``), gosup also writes ``NS > step`` and ``NS < step`` around
each of ``_STEPS`` (the actor's exit handling, drain, records, the launch,
the environment providers) into the same trace file; the wrappers cost a
few microseconds each, so read the stamps for the order and the shares, not
for the totals.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TRACE_VAR = "GOSUP_BENCH_TRACE"
Event = tuple[int, str, int, str]  # (monotonic ns, "exit" | "exec", pid, filename or "")


# -- inside gosup ----------------------------------------------------------------------


def _run_gosup() -> None:
    import subprocess as sp

    from supervisor.core import spawn

    marks = open(os.environ[TRACE_VAR], "a", buffering=1)  # noqa: SIM115 - lives as long as gosup
    on_exit = spawn.Child._on_exit_readable
    popen_init = sp.Popen.__init__

    def exit_readable(self: spawn.Child) -> None:
        marks.write(f"{time.monotonic_ns()} cb\n")
        on_exit(self)

    def popen(self: sp.Popen[bytes], *args: Any, **kwargs: Any) -> None:
        called = time.monotonic_ns()
        popen_init(self, *args, **kwargs)
        if "-startfile" in (args[0] if args else kwargs.get("args", ())):  # goapp, not a probe
            marks.write(f"{called} popen {self.pid}\n")

    spawn.Child._on_exit_readable = exit_readable  # type: ignore[method-assign]
    sp.Popen.__init__ = popen  # type: ignore[method-assign]
    if os.environ.get(STAMPS_VAR):
        _stamp_steps(marks)
    import runpy

    sys.argv = ["gosup", *sys.argv[1:]]
    runpy.run_module("supervisor", run_name="__main__", alter_sys=True)


STAMPS_VAR = "GOSUP_BENCH_STAMPS"
# The steps of a restart (``--stamps``): when each is entered and left.
_STEPS = (
    ("supervisor.core.program", "Program", "_handle"),
    ("supervisor.core.program", "Program", "_on_exit"),
    ("supervisor.core.program", "Program", "_on_deadline"),
    ("supervisor.core.program", "Program", "_spawn"),
    ("supervisor.core.program", "Program", "_transition"),
    ("supervisor.core.program", "Program", "_exit_info"),
    ("supervisor.core.program", "Program", "_record"),
    ("supervisor.core.output", "OutputCapture", "drain"),
    ("supervisor.core.output", "OutputCapture", "attach"),
    ("supervisor.core.spawn", None, "launch"),
    ("supervisor.core.spawn", None, "start_ticks"),
    ("supervisor.core.spawn", None, "_prepare_known"),
    ("supervisor.core.spawn", None, "start_child"),
    ("supervisor.core.program", "Context", "extra_env"),
)


def _stamp_steps(marks: Any) -> None:
    """Wrap each of ``_STEPS`` to write ``NS > name`` on entry, ``NS < name`` on return."""
    import functools
    import importlib
    import inspect

    def wrap(fn: Any, name: str) -> Any:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                marks.write(f"{time.monotonic_ns()} > {name}\n")
                try:
                    return await fn(*args, **kwargs)
                finally:
                    marks.write(f"{time.monotonic_ns()} < {name}\n")

            return awrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            marks.write(f"{time.monotonic_ns()} > {name}\n")
            try:
                return fn(*args, **kwargs)
            finally:
                marks.write(f"{time.monotonic_ns()} < {name}\n")

        return wrapper

    for module, cls, attr in _STEPS:
        owner = importlib.import_module(module)
        if cls is not None:
            owner = getattr(owner, cls)
        setattr(owner, attr, wrap(getattr(owner, attr), attr))


# -- around it ---------------------------------------------------------------------------


def traced_gosup_class() -> type:
    from drivers import _install
    from drivers.gosup import GosupDriver

    class TracedGosup(GosupDriver):
        """gosup run through this file, its marks going to ``trace``."""

        def __init__(self, *args: Any, trace: Path) -> None:
            super().__init__(*args)
            self.trace = trace

        def command(self) -> list[str]:
            return [_install.gosup_python(), __file__, "run", "app.toml", "--no-echo"]

        def env(self) -> dict[str, str]:
            return {**super().env(), TRACE_VAR: str(self.trace)}

    return TracedGosup


def TracedGosup(wd: Path, programs: list[Any], settings: Any, trace: Path) -> Any:
    return traced_gosup_class()(wd, programs, settings, trace=trace)


@contextlib.contextmanager
def kernel_events(data: Path) -> Iterator[Callable[[], list[Event]]]:
    """``perf record`` of process exits and execs while the block runs; the
    yielded function parses them afterwards."""
    perf = shutil.which("perf")
    if perf is None:
        raise SystemExit("--breakdown needs perf (linux-perf) on PATH")
    argv = [perf, "record", "-q", "-k", "mono", "-a", "-o", str(data)]
    argv += ["-e", "sched:sched_process_exit,sched:sched_process_exec"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # perf opens its buffers before the first kill
    if proc.poll() is not None:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        raise SystemExit(f"perf record failed (root needed): {err.strip()[-300:]}")
    events: list[Event] = []
    try:
        yield lambda: events
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    out = subprocess.run(
        [perf, "script", "-i", str(data), "--ns", "-F", "pid,time,event,trace"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    events += parse_perf(out)


_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\.(\d+):\s+sched:sched_process_(exit|exec):\s+(.*)$")


def parse_perf(text: str) -> list[Event]:
    out: list[Event] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        pid, sec, frac, kind, rest = m.groups()
        ns = int(sec) * 10**9 + int(frac.ljust(9, "0")[:9])
        if kind == "exit" and "group_dead=true" not in rest:
            continue  # a thread, not the process
        name = rest.split("filename=", 1)[1].split(" pid=")[0] if kind == "exec" else ""
        out.append((ns, kind, int(pid), name))
    return out


def _marks(trace: Path) -> tuple[list[int], list[tuple[int, int]]]:
    cbs, popens = [], []
    for line in trace.read_text().splitlines() if trace.exists() else []:
        parts = line.split()
        if parts[1:2] == ["cb"]:
            cbs.append(int(parts[0]))
        elif parts[1:2] == ["popen"]:
            popens.append((int(parts[0]), int(parts[2])))
    return cbs, popens


def stages(
    events: list[Event], trace: Path, startfile: Path, latencies: dict[int, float]
) -> dict[str, Any]:
    """Per restart, ms in each stage; their medians under "p50"."""
    import common

    offset = time.time_ns() - time.monotonic_ns()  # wall -> monotonic
    starts = {pid: ns - offset for pid, ns in common.startfile_lines(startfile)}
    cbs, popens = _marks(trace)
    exits = {pid: ns for ns, kind, pid, _ in events if kind == "exit"}
    execs: dict[int, list[tuple[int, str]]] = {}
    for ns, kind, pid, name in events:
        if kind == "exec":
            execs.setdefault(pid, []).append((ns, name))
    rows: list[dict[str, float]] = []
    for (_, old), (called, new) in itertools.pairwise(popens):
        died = exits.get(old)
        cb = next((c for c in cbs if died is not None and died <= c <= called), None)
        goapp = [ns for ns, name in execs.get(new, []) if name.endswith("/goapp")]
        if died is None or cb is None or not goapp or new not in starts or new not in latencies:
            continue
        total = latencies[new]
        rows.append({
            "kill": total - (starts[new] - died) / 1e6,
            "detection": (cb - died) / 1e6,
            "bookkeeping": (called - cb) / 1e6,
            "fork/exec": (goapp[0] - called) / 1e6,
            "Go start": (starts[new] - goapp[0]) / 1e6,
            "total": total,
        })  # fmt: skip
    keys = ["kill", "detection", "bookkeeping", "fork/exec", "Go start", "total"]
    p50 = {k: statistics.median(r[k] for r in rows if k in r) for k in keys if rows}
    return {"restarts": rows, "p50": p50, "n": len(rows)}


def table(data: dict[str, Any]) -> dict[str, Any]:
    import common

    floor, gosup = data["floor"].get("p50", {}), data["gosup"].get("p50", {})
    what = {
        "kill": "SIGKILL sent -> the process is dead (kernel)",
        "detection": "dead -> the supervisor's code runs (pidfd wakeup / waitpid)",
        "bookkeeping": "-> Popen called (records, state machine)",
        "fork/exec": "Popen -> goapp exec'd (gosup: via its exec helper)",
        "Go start": "exec -> goapp's start stamp",
        "total": "SIGKILL -> start stamp",
    }
    rows = []
    for key, text in what.items():
        f, g = floor.get(key), gosup.get(key)
        rows.append([key, text, f, g, None if f is None or g is None else g - f])
    n = f"floor {data['floor'].get('n', 0)}, gosup {data['gosup'].get('n', 0)} restarts"
    cols = ["stage", "from -> to", "floor p50 ms", "gosup p50 ms", "gosup - floor"]
    return common.table(f"Restart latency by stage (medians; {n})", cols, rows)


if __name__ == "__main__":
    _run_gosup()
