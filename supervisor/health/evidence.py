"""Is a saved dump evidence? Only when it holds goroutine stacks.

A program that traps SIGQUIT (caddy does) answers it with a log line and
exits; a pprof endpoint behind a proxy may answer a login page. Saving that
and writing ``evidence_saved`` would tell the operator that the hang is
documented when it is not. So every goroutine dump is read back before it
is recorded: ``evidence_saved`` for stacks, ``evidence_failed`` with a
glimpse of what came instead.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from loguru import logger

from supervisor.history import History

# What the Go runtime writes for every goroutine, in a SIGQUIT dump and in
# pprof's debug=2 text: "goroutine 1 [running]:", or with GOTRACEBACK=system
# "goroutine 0 gp=0xb2e700 m=0 mp=0xb2f8e0 [idle]:" (debug=1 starts "goroutine profile:").
_STACKS = re.compile(rb"^goroutine (\d+ [^\n]*\[[^\n]*\]:|profile: total )", re.MULTILINE)
GOROUTINE_KINDS = frozenset({"pprof", "sigquit"})  # the kinds that must hold stacks
GLIMPSE = 160  # bytes of a non-dump quoted in evidence_failed


def holds_stacks(data: bytes) -> bool:
    return _STACKS.search(data) is not None


def verdict(path: Path, kind: str) -> str | None:
    """None when ``path`` is evidence of ``kind``; else what was received instead."""
    if kind not in GOROUTINE_KINDS:
        return None  # a heap profile is binary: its size is the check
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot read it back: {exc.strerror or exc}"
    if holds_stacks(data):
        return None
    glimpse = data.strip()[:GLIMPSE].decode("utf-8", "replace")
    return f"no goroutine stacks in the {len(data)} bytes received: {glimpse!r}"


def record(history: History, program: str, path: Path, kind: str, **extra: object) -> bool:
    """``evidence_saved`` for a real dump (True); else ``evidence_failed`` and the
    file goes (a non-dump must not push a real one out of dump_keep)."""
    error = verdict(path, kind)
    if error is None:
        history.record("evidence_saved", program, path=str(path), kind=kind, **extra)
        logger.info("{}: {} evidence saved to {}", program, kind, path)
        return True
    failed(history, program, kind, error)
    with contextlib.suppress(OSError):
        path.unlink()
    return False


def failed(history: History, program: str, kind: str, error: str) -> None:
    history.record("evidence_failed", program, kind=kind, error=error)
    logger.warning("{}: no {} evidence: {}", program, kind, error)
