"""A crash loop's log is folded (issue 18): the first failed runs in a row
are logged in full, later ones once every FOLD_EVERY seconds with how many
were not; every run stays in the history. A healthy run ends the fold."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from loguru import logger
from test_program_unit import Harness, run

from supervisor.config.appconfig import BackoffSpec
from supervisor.core.program import FOLD_EVERY, LOUD_FAILURES, Start
from supervisor.core.states import ProcessState

S = ProcessState
NEVER_GIVE_UP = BackoffSpec(
    initial=1.0, max=8.0, multiplier=2.0, jitter=0.0, reset_after=60.0, give_up_after=0
)
SPACING = 10.0  # fake seconds between two failed runs (past the longest backoff)


def test_a_long_failure_series_logs_one_exit_line_per_fold(tmp_path: Path) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.rstrip("\n")), format="{level} {message}")
    runs = LOUD_FAILURES + int(FOLD_EVERY // SPACING) * 2  # two folds after the loud ones

    async def body(h: Harness) -> None:
        h.program.post(Start())
        for n in range(1, runs + 1):
            await h.started(n)
            h.child.exit(1)
            await h.until(lambda: h.program.state is S.BACKOFF, f"backoff #{n}")
            await h.advance(SPACING)
        await h.started(runs + 1)
        await h.advance(5.0)  # RUNNING
        await h.advance(60.0)  # healthy for reset_after
        h.child.exit(-signal.SIGKILL)  # a crash after a healthy run: not a failed run
        await h.started(runs + 2)
        assert len(h.records("exited")) == runs + 1  # every run is in the history

    try:
        run(tmp_path, body, backoff=NEVER_GIVE_UP, start_seconds=5.0)
    finally:
        logger.remove(sink)
    exits = [ln for ln in lines if ln.startswith("WARNING api: exited: ")]
    starts = [ln for ln in lines if ln.startswith("INFO api: started pid ")]
    quiet = [ln for ln in lines if ln.startswith("DEBUG api: ") and "exited" in ln]
    assert len(exits) == LOUD_FAILURES + 2 + 1, exits  # loud, two folds, the healthy run's
    assert exits[LOUD_FAILURES - 1].endswith(
        f"exit code 1 ({LOUD_FAILURES} failed runs in a row: from now on one exit line"
        f" every {FOLD_EVERY:g}s; `gosup history api` has every run)"
    ), exits
    per_fold = int(FOLD_EVERY // SPACING)
    for fold, line in enumerate(exits[LOUD_FAILURES : LOUD_FAILURES + 2], start=1):
        series = LOUD_FAILURES + fold * per_fold
        assert line.endswith(
            f"(failed run {series} in a row; {per_fold - 1} more exits since the last line,"
            " each in the history)"
        ), line
    assert exits[-1] == "WARNING api: exited: signal SIGKILL", exits[-1]
    assert len(quiet) == 2 * (per_fold - 1), quiet
    # starts 1..LOUD (no failure yet .. LOUD-1 failures), and the one after the healthy run
    assert len(starts) == LOUD_FAILURES + 1, starts


def test_a_short_series_is_logged_in_full(tmp_path: Path) -> None:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.rstrip("\n")), format="{level} {message}")

    async def body(h: Harness) -> None:
        h.program.post(Start())
        for n in range(1, LOUD_FAILURES):
            await h.started(n)
            h.child.exit(1)
            await h.until(lambda: h.program.state is S.BACKOFF, f"backoff #{n}")
            await h.advance(SPACING)
        await h.started(LOUD_FAILURES)

    try:
        run(tmp_path, body, backoff=NEVER_GIVE_UP, start_seconds=5.0)
    finally:
        logger.remove(sink)
    exits: list[Any] = [ln for ln in lines if ln.startswith("WARNING api: exited: ")]
    assert exits == ["WARNING api: exited: exit code 1"] * (LOUD_FAILURES - 1)
    assert sum(ln.startswith("INFO api: started pid ") for ln in lines) == LOUD_FAILURES
