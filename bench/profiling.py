"""py-spy, installed into bench/.cache/venv, sampling gosup while a benchmark
measures it (``--profile``): the raw stacks go to bench/results/profile-*.txt
and a short list of hot spots into the result JSON."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import CACHE


@contextlib.contextmanager
def profiled(
    pid: int | None, out: Path, enabled: bool, rate: int = 200
) -> Iterator[dict[str, Any]]:
    """py-spy samples ``pid`` while the block runs; afterwards the dict holds the
    hot spots (``top_self``: leaf functions, ``top_gosup``: gosup functions with
    their inclusive share) and the raw collapsed stacks are in ``out``."""
    report: dict[str, Any] = {}
    spy = CACHE / "venv" / "bin" / "py-spy"
    if not enabled or pid is None:
        yield report
        return
    if not spy.exists():
        report["error"] = f"py-spy not installed at {spy}"
        yield report
        return
    argv = [str(spy), "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", str(rate)]
    proc = subprocess.Popen(
        [*argv, "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield report
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if out.exists():
            report.update(hot_spots(out))
            report["raw"] = str(out)
        else:
            report["error"] = f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"


def hot_spots(raw: Path, top: int = 12) -> dict[str, Any]:
    """Summarise py-spy's collapsed stacks ("f1;f2;...;leaf count" per line)."""
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if frames:
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
        for frame in set(frames):
            if "supervisor/" in frame or "(supervisor" in frame:
                inclusive[frame] = inclusive.get(frame, 0) + count

    def share(counts: dict[str, int]) -> list[list[Any]]:
        # Frames on (nearly) every stack (the entry point, the loop) say nothing.
        ranked = [kv for kv in counts.items() if kv[1] < 0.9 * total]
        ranked = sorted(ranked, key=lambda kv: -kv[1])[:top]
        return [[name, round(100 * n / total, 1)] for name, n in ranked]

    return {"samples": total, "top_self": share(leaf), "top_gosup": share(inclusive)}


def _frame(text: str) -> str:
    """'func (path/file.py:123)' -> 'func (path/file.py)': group a function's lines."""
    head, sep, _ = text.rpartition(":")
    return f"{head})" if sep and text.endswith(")") else text
