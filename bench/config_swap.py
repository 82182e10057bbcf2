"""Config swap latency: from the rename onto the staging path to the reload
signal delivered to the program.

A real ``gosup run`` supervises goapp with ``-config config/app.conf
-signal-file sig -report-signals``; goapp appends "signal: SIGHUP" to its
signal file when the signal arrives, then "config: sha256=..." once it has
re-read the file. Each iteration prepares a new 1 MiB version off the clock
(a temporary file in the staging directory, fsynced, and its ``.sha256``
sidecar, as ``gosup stage`` does), then takes the time and renames it onto
the staging path. The signal file is watched with inotify (ctypes; a 0.5 ms
polling loop where inotify is unavailable), so the end stamps are taken
within microseconds of goapp's write, without a busy loop stealing the CPU
gosup needs. Columns:

- applied: the ``config_applied`` history stamp (millisecond wall clock):
  watch + claim + SHA-256 + swap with fsyncs;
- signal: goapp's "signal: SIGHUP" line (the target: p99 <= 50 ms);
- reloaded: goapp's line with the new hash (the program has read the file).

The working directory is a temporary directory on the machine's /tmp (here
on disk, so the fsyncs are real). Dirty pages of earlier work are written
back first (``os.sync``): a swap's fsync waits behind any writeback (20
swaps with 2.4 GB still queued: p90 458 ms; with none, 17 ms). The
polling observer is measured too, with fewer iterations, for information
(its interval is 0.1 s by design).

    python bench/config_swap.py [--quick] [--iterations N] [--size BYTES]
                                [--observers inotify,polling]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import common

NAME = "config_swap"
TARGET_MS = 50.0
STEP_TIMEOUT = 30.0
IN_MODIFY = 0x00000002


def app_toml(goapp: Path) -> str:
    return f"""\
[programs.app]
command = ["{goapp}", "-config", "config/app.conf", "-signal-file", "sig", "-report-signals"]
start_seconds = "200ms"

[[programs.app.config_files]]
path = "config/app.conf"
on_change = "reload"
"""


# -- watching the signal file ------------------------------------------------------------


class FileWatch:
    """Wait for a file to grow: inotify when the kernel offers it, else a short poll."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.method = "polling every 0.5 ms"
        self._fd = -1
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd >= 0 and libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) >= 0:
            self._fd = fd
            self.method = "inotify (IN_MODIFY) on goapp's signal file"
        elif fd >= 0:
            os.close(fd)

    def wait(self, timeout: float) -> None:
        """Return when the file may have changed (or after ``timeout``)."""
        if self._fd < 0:
            time.sleep(0.0005)
            return
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._fd, 65536)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)


class SignalFile:
    """The lines goapp appends, read as they come."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size
        self.partial = b""

    def new_lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


# -- one run ------------------------------------------------------------------------------------


def history_ts(state_dir: Path, event: str, sha256: str) -> float | None:
    """Wall-clock stamp of the record of ``event`` for this version (None if absent)."""
    path = state_dir / "history.jsonl"
    for line in reversed(path.read_text().splitlines()):
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") == event and rec.get("sha256") == sha256:
                return datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
    return None


def is_running(state_dir: Path) -> bool:
    path = state_dir / "history.jsonl"
    return path.exists() and '"event":"running"' in path.read_text()


def prepare(config_dir: Path, staging: Path, i: int, size: int) -> tuple[Path, str]:
    """A new version next to the staging path plus its sidecar, all off the clock."""
    content = f"version {i}\n".encode() + os.urandom(size)
    tmp = config_dir / ".bench-new"
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    digest = hashlib.sha256(content).hexdigest()
    side_tmp = config_dir / ".bench-new.sha256"
    side_tmp.write_text(f"{digest}  app.conf\n")
    os.replace(side_tmp, staging.with_name(staging.name + ".sha256"))
    return tmp, digest


def one_swap(
    watch: FileWatch, sig: SignalFile, tmp: Path, staging: Path, digest: str
) -> tuple[float, float, float]:
    """Rename onto the staging path; (wall t0, ms to the signal, ms to the reload)."""
    signal_ms = reload_ms = None
    wall0 = time.time()
    t0 = time.perf_counter()
    os.rename(tmp, staging)
    deadline = t0 + STEP_TIMEOUT
    while reload_ms is None:
        for line in sig.new_lines():
            now = (time.perf_counter() - t0) * 1000
            if line == "signal: SIGHUP" and signal_ms is None:
                signal_ms = now
            elif line.startswith(f"config: sha256={digest}"):
                reload_ms = now
        if reload_ms is None:
            if time.perf_counter() > deadline:
                raise common.BenchError(f"no reload of {digest[:12]} within {STEP_TIMEOUT}s")
            watch.wait(0.05)
    if signal_ms is None:
        raise common.BenchError("goapp reloaded without reporting the signal")
    return wall0, signal_ms, reload_ms


@contextlib.contextmanager
def running_gosup(wd: Path, goapp: Path, polling: bool, tag: str) -> Iterator[Path]:
    """A gosup supervising goapp in ``wd``; yields its state directory."""
    (wd / "config").mkdir()
    (wd / "config" / "app.conf").write_bytes(b"version start\n")
    (wd / "app.toml").write_text(app_toml(goapp))
    extra = {"GOSUP_FORCE_POLLING": "1"} if polling else {}
    with open(wd / "gosup.err", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "run", "app.toml", "--no-echo"],
            cwd=wd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=common.bench_env(tag, PYTHONPATH=str(common.ROOT), **extra),
            start_new_session=True,
        )
    try:
        # RUNNING, not just started: gosup holds a reload back while a start is under way.
        common.wait_for(lambda: is_running(wd / ".gosup"), 60, "goapp running under gosup")
        yield wd / ".gosup"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            common.kill_group(proc)
            proc.wait(10)
        common.sweep(tag)


def measure(goapp: Path, observer: str, iterations: int, size: int, keep: bool) -> dict[str, Any]:
    common.log(f"{observer}: {iterations} swaps of {size} bytes")
    os.sync()  # nobody's writeback queued before gosup's fsyncs (see run.py)
    signal_ms: list[float] = []
    reload_ms: list[float] = []
    applied_ms: list[float] = []
    tag = common.new_tag()
    with (
        common.workdir(f"{NAME}-{observer}", keep) as wd,
        running_gosup(wd, goapp, observer == "polling", tag) as state_dir,
    ):
        staging = wd / "config" / "app.conf.new"
        sig = SignalFile(wd / "sig")
        watch = FileWatch(wd / "sig")
        try:
            for i in range(iterations):
                tmp, digest = prepare(wd / "config", staging, i, size)
                wall0, to_signal, to_reload = one_swap(watch, sig, tmp, staging, digest)
                signal_ms.append(to_signal)
                reload_ms.append(to_reload)
                applied = history_ts(state_dir, "config_applied", digest)
                if applied is not None:
                    applied_ms.append(max(0.0, (applied - wall0) * 1000))
                time.sleep(0.02)  # let goapp and gosup settle: swaps measured one at a time
        finally:
            watch.close()
    return {
        "method": watch.method,
        "applied_ms": common.describe(applied_ms),
        "signal_ms": common.describe(signal_ms),
        "reload_ms": common.describe(reload_ms),
        "samples_signal_ms": [round(v, 3) for v in signal_ms],
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short smoke run")
    p.add_argument("--iterations", type=int, help="swaps per observer (default 200, quick 20)")
    p.add_argument("--size", type=int, default=common.MiB, help="bytes per version (1 MiB)")
    p.add_argument(
        "--observers",
        help="inotify,polling (default both; --quick: inotify only)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    iterations = args.iterations or (20 if args.quick else 200)
    observers = (args.observers or ("inotify" if args.quick else "inotify,polling")).split(",")
    goapp = common.goapp()
    results: dict[str, Any] = {}
    for observer in observers:
        n = iterations if observer == "inotify" else min(iterations, 50)
        try:
            results[observer] = measure(goapp, observer, n, args.size, args.keep)
        except common.BenchError as exc:
            common.log(f"{observer}: failed: {exc}")
            results[observer] = {"error": str(exc)}
    rows = []
    for observer, res in results.items():
        if "error" in res:
            rows.append([observer, "error", res["error"], "", "", "", ""])
            continue
        s, r, a = res["signal_ms"], res["reload_ms"], res["applied_ms"]
        rows.append([observer, s["n"], a.get("p50"), s["p50"], s["p90"], s["p99"], s["max"]])
        rows.append(
            [f"{observer} (reloaded)", r["n"], None, r["p50"], r["p90"], r["p99"], r["max"]]
        )
    size = f"{args.size / common.MiB:g} MiB" if args.size >= common.MiB else f"{args.size} B"
    tab = common.table(
        f"Config swap: rename onto the staging path -> reload signal delivered ({size}, ms)",
        ["observer", "n", "applied p50", "signal p50", "p90", "p99", "max"],
        rows,
    )
    p99 = results.get("inotify", {}).get("signal_ms", {}).get("p99")
    targets = [
        {
            "target": f"p99 <= {TARGET_MS:g} ms (inotify, {size})",
            "measured": "-" if p99 is None else f"{p99:.1f} ms",
            "met": None if p99 is None else p99 <= TARGET_MS,
        }
    ]
    method = next((r["method"] for r in results.values() if "method" in r), "-")
    data = {
        "params": {"iterations": iterations, "size": args.size, "observers": observers},
        "method": f"end stamps: {method}; start: perf_counter before rename(2)",
        "results": results,
        "tables": [tab],
        "targets": targets,
    }
    path = common.write_result(NAME, args.quick, data)
    common.print_tables([tab])
    for t in targets:
        print(f"target {t['target']}: {t['measured']} ({'met' if t['met'] else 'MISSED'})")
    print(f"method: {data['method']}\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
