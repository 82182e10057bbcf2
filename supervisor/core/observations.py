"""What the watchers (`supervisor.health`) last saw of a program, kept on the
Program for ``gosup status`` and ``/metrics`` to read.

The watchers write it; the Program only shows it. Sampled numbers (one
flat dict, the names `/metrics` exports) are kept apart from what is not a
sample: how a limit run is building up, the last finding, a failed scrape,
the Go environment the run was started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AGE = "last_sample_age_s"


@dataclass
class Observations:
    # The latest sample of the current run: rss_bytes, open_fds, threads,
    # connections (sockets, when a limit asks), goroutines, heap_inuse_bytes.
    figures: dict[str, int] = field(default_factory=dict)
    scrape_error: str | None = None  # why the Go metrics could not be read, last time
    over_limit: dict[str, int] = field(default_factory=dict)  # limit -> samples over, in a row
    sustain: int | None = None  # samples in a row that make a finding (shown with over_limit)
    sampled_at: float | None = None  # on the program's clock; None: no sample of this run yet
    samples: int = 0  # samples evaluated so far, all runs (tests wait on it, not on time)
    # Kept across runs: the last limit that fired, and the GOMEMLIMIT/GOMAXPROCS
    # the latest start was given.
    limit_exceeded: dict[str, Any] | None = None
    go_env: dict[str, str] = field(default_factory=dict)
    # The liveness probe: failures in a row in this run, and the last verdict
    # (probe_failed: {"probe", "error"}) kept across runs.
    live_failures: int = 0
    probe_failed: dict[str, Any] | None = None

    def sampled(self, now: float) -> None:
        self.sampled_at = now
        self.samples += 1

    def run_ended(self) -> None:
        """Forget what belonged to the run that is gone."""
        self.figures = {}
        self.scrape_error = None
        self.over_limit = {}
        self.sustain = None
        self.sampled_at = None
        self.live_failures = 0

    def status(self, now: float) -> dict[str, Any]:
        """The fields ``gosup status`` shows, absent while unknown."""
        out: dict[str, Any] = {}
        if self.go_env:
            out["go_env"] = dict(self.go_env)
        out.update(self.figures)
        if self.scrape_error is not None:
            out["scrape_error"] = self.scrape_error
        if self.over_limit:
            out.update(over_limit=dict(self.over_limit), sustain=self.sustain)
        if self.sampled_at is not None:
            out[AGE] = round(now - self.sampled_at, 3)
        if self.limit_exceeded is not None:
            out["limit_exceeded"] = dict(self.limit_exceeded)
        if self.live_failures:
            out["live_failures"] = self.live_failures
        if self.probe_failed is not None:
            out["probe_failed"] = dict(self.probe_failed)
        return out
