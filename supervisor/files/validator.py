"""Running a config file's validator (its verdict on one claimed version), and
a program's ``reload_command`` (its verdict on a reload), the same way.

Synchronous (callers run it in a thread). The validator is started by
``spawn.start_child`` like every child of gosup: in its own session, so that
one that hangs is killed with everything it started (a shell wrapper's
children included); with the parent-death signal, so that it dies with a
gosup killed meanwhile; and with gosup's marks, so that the next gosup finds
what its children left. Its output is read to a bounded tail: a validator
may print without limit, and only the tail goes to the history.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.core import spawn
from supervisor.core.lines import Tail

OUTPUT_TAIL = 2000  # characters of a failed validator's output kept in the history


@dataclass(frozen=True)
class Verdict:
    ok: bool
    exit_code: int | None  # None: it could not run, or was killed at the timeout
    output_tail: str


def validate(
    argv: Sequence[str], file: Path, cwd: Path, env: Mapping[str, str], timeout: float
) -> Verdict:
    """Run the validator with ``{file}`` replaced; ok when it exits 0 within ``timeout``.

    ``env`` is the program's child environment with gosup's marks
    (``spawn.child_environment``).
    """
    args = [arg.replace("{file}", str(file)) for arg in argv]
    return run_check(args, cwd, env, timeout, "validator")


def reload(
    argv: Sequence[str], pid: int, cwd: Path, env: Mapping[str, str], timeout: float
) -> Verdict:
    """Run a ``reload_command`` with ``{pid}`` replaced; ok when it exits 0 within ``timeout``."""
    args = [arg.replace("{pid}", str(pid)) for arg in argv]
    return run_check(args, cwd, env, timeout, "reload command")


def run_check(
    args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float, what: str
) -> Verdict:
    """Run ``args``; ok when it exits 0 within ``timeout`` (then killed with its group)."""
    try:
        proc = spawn.start_child(list(args), cwd, env, stderr=subprocess.STDOUT)
    except spawn.SpawnError as exc:
        return Verdict(False, None, f"cannot run {what} {args[0]!r}: {exc}")
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with proc.stdout:
        out, timed_out = _read_tail(proc.stdout.fileno(), deadline)
    try:
        # Its output may end before it does (it closed stdout): the deadline still holds.
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        text = _text(out) + f"\n({what} killed: no answer within {timeout:g}s)"
        return Verdict(False, None, text.lstrip("\n"))
    return Verdict(proc.returncode == 0, proc.returncode, _text(out))


def _read_tail(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Read ``fd`` to its end or the deadline, keeping only the last bytes.
    Returns (tail, whether the deadline passed first)."""
    tail = Tail(OUTPUT_TAIL * 4)  # enough bytes for OUTPUT_TAIL characters of UTF-8
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return tail.bytes(), False
            tail.feed(chunk)
    return tail.bytes(), True


def _text(out: bytes) -> str:
    return out.decode(errors="replace")[-OUTPUT_TAIL:]
