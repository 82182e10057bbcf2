"""One small driver per supervisor: write its config for N programs, start it,
find the supervisor's own pids and the child pids, stop it.

Every driver runs the same programs (goapp argv lists) in its own work
directory, captures each program's stdout to ``log_path(name)``, and is used
as a context manager so that a failing benchmark still stops what it started::

    with drivers.make("supervisord", workdir, programs, Settings()) as d:
        d.wait_children(len(programs), timeout=60)
        ...

`Settings` holds the few knobs a benchmark needs, each mapped by every driver
to its own config vocabulary (documented in docs/benchmarks.md).
"""

from __future__ import annotations

import abc
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import common
import psutil

NAMES = ("gosup", "supervisord", "circus", "pm2")


@dataclass(frozen=True)
class Program:
    name: str
    argv: tuple[str, ...]  # absolute binary path first


@dataclass(frozen=True)
class Settings:
    # Restart at once after a single crash of a healthy program (restart latency).
    fast_restart: bool = False
    # The program runs once: never restart it, whatever its exit (log capture).
    oneshot: bool = False
    # gosup only: a [limits] section (interval 5s) on every program (overhead).
    sampling: bool = False
    # gosup only: no resource sampler at all (GOSUP_SAMPLING=0; by default gosup
    # samples every program every 5 s for status and metrics).
    sampling_off: bool = False
    # circus only: its check_delay (it notices a dead process only when it polls);
    # None: 0.1 with fast_restart, else circus's default (5 s).
    check_delay: float | None = None


class Driver(abc.ABC):
    """A supervisor under test. Subclasses write the config and know how to start and stop."""

    name = ""
    # With this supervisor's defaults, how long a run must have lasted for its
    # crash to be restarted at once, without a backoff (restart latency).
    reset_window = 0.0

    def __init__(self, workdir: Path, programs: list[Program], settings: Settings) -> None:
        self.dir = workdir
        self.programs = programs
        self.settings = settings
        self.tag = common.new_tag()
        self.proc: subprocess.Popen[bytes] | None = None
        self.leftovers = 0  # processes the final sweep had to kill (a cleanup bug, if > 0)
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    # -- what subclasses provide ----------------------------------------------------

    @abc.abstractmethod
    def write_config(self) -> None: ...

    @abc.abstractmethod
    def command(self) -> list[str]:
        """argv that starts the supervisor in the foreground (pm2: the starting CLI)."""

    def env(self) -> dict[str, str]:
        return common.bench_env(self.tag, scrub_python=True)

    def supervisor_pids(self) -> list[int]:
        """The supervisor's own processes (measured for CPU and RSS; children excluded)."""
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def graceful_stop(self, timeout: float) -> None:
        """Ask the supervisor to stop its programs and exit; wait at most ``timeout``."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def log_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.stdout.log"

    def err_path(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.stderr.log"

    # -- life -------------------------------------------------------------------------

    def start(self) -> None:
        self.write_config()
        with open(self.dir / "supervisor.out", "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful stop, then SIGKILL for anything it left (by process group and tag)."""
        try:
            if self.proc is not None:
                self.graceful_stop(timeout)
        finally:
            if self.proc is not None:
                common.kill_group(self.proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
            self.leftovers = common.sweep(self.tag)

    def __enter__(self) -> Driver:
        try:
            self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ fails
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- observing -----------------------------------------------------------------------

    def assert_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None and not self.detached():
            raise common.BenchError(
                f"{self.name} exited with {self.proc.returncode}: {self.output_tail()}"
            )

    def detached(self) -> bool:
        """True for supervisors whose daemon is not the process we started (pm2)."""
        return False

    def output_tail(self, n: int = 1500) -> str:
        path = self.dir / "supervisor.out"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def child_pids(self) -> dict[str, int]:
        """program name -> pid of its running goapp child (found in the supervisor's tree)."""
        found: dict[str, int] = {}
        for root in self.supervisor_pids():
            try:
                kids = psutil.Process(root).children(recursive=True)
            except psutil.Error:
                continue
            for kid in kids:
                name = _goapp_name(kid)
                if name is not None:
                    found[name] = kid.pid
        return found

    def wait_children(self, n: int, timeout: float) -> dict[str, int]:
        """Wait until ``n`` programs have a running child; return them."""

        def ready() -> dict[str, int] | None:
            self.assert_alive()
            pids = self.child_pids()
            return pids if len(pids) >= n else None

        return common.wait_for(ready, timeout, f"{n} children of {self.name}", poll=0.2)


def _goapp_name(proc: psutil.Process) -> str | None:
    """The -name of a goapp process, None for anything else (or a zombie)."""
    try:
        argv = proc.cmdline()
    except psutil.Error:
        return None
    if not argv or os.path.basename(argv[0]) != "goapp" or "-name" not in argv[:-1]:
        return None
    return argv[argv.index("-name") + 1]


def make(name: str, workdir: Path, programs: list[Program], settings: Settings) -> Driver:
    from drivers import circus, gosup, pm2, supervisord

    classes: dict[str, type[Driver]] = {
        "gosup": gosup.GosupDriver,
        "supervisord": supervisord.SupervisordDriver,
        "circus": circus.CircusDriver,
        "pm2": pm2.Pm2Driver,
    }
    return classes[name](workdir, programs, settings)


def availability(names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"ok": bool, "version": str | None, "reason": str | None} (installing
    the incumbents into bench/.cache on first use)."""
    from drivers import _install

    return _install.ensure(names)


def wait_gone(pids: list[int], timeout: float) -> bool:
    """True once none of ``pids`` is alive (zombies count as gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(pid_alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
