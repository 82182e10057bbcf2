"""The resource sampler: every program's process tree (and its Go runtime),
sampled on a schedule; a limit over for ``sustain`` samples in a row goes to
the leak response (`supervisor.health.watermarks`).

One sampler task serves every program. Each program has its own next-due
time on the loop's clock, so programs with different intervals share the
task, and the task sleeps until the earliest one is due (or a program
starts). Programs without a ``[limits]`` section are still sampled, first
``FIRST_SAMPLE`` after a start and then every ``DEFAULT_INTERVAL``, for
``gosup status`` and the metrics.

A round that a state change woke looks only at the programs that changed
(a crash loop of hundreds of programs wakes it at every run); a round that
is due, or that finds a new programs mapping (a reload), looks at all of
them. A new run's /proc files are first read by its first sample, not when
it starts: it is being exec'd then, and a crash-looping run is gone long
before.

A sample reads the process tree from /proc (see `supervisor.health.sampling` for
what that costs and why), looks for new descendants at most every
``TREE_REFRESH`` seconds where a limit is enforced, every
``FIGURES_TREE_REFRESH`` where figures are only shown (a pass over all of
/proc, in a thread, skipped when no process was made on the machine since
the last pass), and
scrapes a program's Go metrics over one kept-alive connection
(`supervisor.health.goscrape`: started in the turn that reads /proc, ended
by a callback in the turn its answer arrives, no task of its own). What it
finds is kept in ``program.observations``.

Every task the sampler starts (its loop, a tree pass, a leak response) is
owned by it: a failure is logged as it happens, and ``close`` cancels and
awaits them all; ``close`` also drops every scraper's connection.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from loguru import logger

from supervisor.config import LimitsSpec
from supervisor.core.program import Program
from supervisor.core.states import ProcessState
from supervisor.health.goscrape import GoScraper
from supervisor.health.sampling import Hysteresis, ProcessTree, children_map, last_pid
from supervisor.health.watermarks import LeakResponse

S = ProcessState
# Programs without [limits]: figures for status and metrics only, so a sample
# 5 s after a start (the figures appear soon), then every 15 s: a figure on
# show needs no 5 s freshness, and an idle gosup's CPU is mostly this
# (docs/benchmarks.md, "Idle overhead as shipped").
FIRST_SAMPLE = 5.0
DEFAULT_INTERVAL = 15.0
TREE_REFRESH = 10.0  # how often descendants are looked for, for a program with limits
FIGURES_TREE_REFRESH = 60.0  # ... and for figures only (no limit to enforce)
EARLY = 0.1  # a sample may be taken this fraction of its interval early
SAMPLED_STATES = frozenset({S.STARTING, S.RUNNING})


@dataclass
class _Sampled:
    """One program as the sampler follows it: its schedule and current run."""

    program: Program
    limits: LimitsSpec | None
    interval: float
    next_due: float
    tree: ProcessTree | None = None  # the run being sampled
    hysteresis: Hysteresis | None = None
    scrape_error: str | None = None  # the last one logged
    go: dict[str, int] = field(default_factory=dict)  # the last Go figures read
    scraper: GoScraper | None = None  # go_metrics, over its kept-alive connection
    scraping: tuple[int, dict[str, int]] | None = None  # the pid and /proc figures it waits on

    @property
    def sockets(self) -> bool:
        return self.limits is not None and self.limits.connections is not None


class ResourceSampler:
    """The supervisor-wide sampler (a service: ``start``/``close``)."""

    def __init__(
        self,
        programs: Callable[[], Mapping[str, Program]],
        leaks: LeakResponse,
        *,
        enabled: bool = True,
    ) -> None:
        self.programs = programs  # the supervisor's programs now (a reload replaces some)
        self.leaks = leaks
        self.enabled = enabled
        self.sampled: dict[str, _Sampled] = {}
        self._children: dict[int, list[int]] = {}
        self._children_at = -math.inf
        self._children_last_pid: int | None = None  # the kernel's last pid at that pass
        self._wake = asyncio.Event()
        # The programs whose state changed since the last round: a round that a
        # state change woke syncs only these (a crash loop of 200 programs
        # wakes the sampler for every run; every program each time was O(n)).
        self._changed: dict[str, Program] = {}
        self._seen: Mapping[str, Program] | None = None  # the mapping the last full sync saw
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self.enabled:
            self._spawn(self._run(), "sampler")
        else:
            logger.warning("resource sampling is off (GOSUP_SAMPLING=0): no limits are enforced")

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # failures were logged already
        for one in self.sampled.values():
            self._forget(one)
            if one.scraper is not None:
                one.scraper.close()
        await asyncio.sleep(0)  # the scrapers' sockets close at this turn

    def on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
        """A state listener: wakes the sampler for a process to sample or forget."""
        if new in SAMPLED_STATES or old in SAMPLED_STATES:
            self._changed[program.name] = program
            self._wake.set()

    # -- tasks -------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.opt(exception=exc).error("sampler: internal error in {}", task.get_name())

    # -- scheduling --------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wake_at = -math.inf  # the first round, and any round after a timeout, is a full one
        while True:
            now = loop.time()
            self._wake.clear()  # a state change from here on (the tree pass awaits): one more round
            changed, self._changed = self._changed, {}
            try:
                if now >= wake_at or self.programs() is not self._seen:
                    # Due (or a reload replaced the mapping): every program.
                    self._sync(now)
                    # Up to EARLY x interval ahead of time: programs fall into batches
                    # that share one wake-up (and one tree refresh) instead of waking
                    # the loop once per program.
                    due = [
                        s for s in self.sampled.values() if s.next_due <= now + EARLY * s.interval
                    ]
                    if self._tree_refresh_due(due, now):
                        await self._refresh_trees(now)
                    if due:
                        self._sample(due, now)
                    wake_at = min((s.next_due for s in self.sampled.values()), default=math.inf)
                else:  # only state changes: only those programs
                    programs = self.programs()
                    for name, program in changed.items():
                        if programs.get(name) is program:  # else a full sync cleans up
                            wake_at = min(wake_at, self._sync_one(name, program, now).next_due)
            except Exception as exc:  # a bug: log it, keep sampling the others next time
                logger.opt(exception=exc).error("sampler: internal error")
                for one in self.sampled.values():
                    one.next_due = max(one.next_due, now + one.interval)
                wake_at = min((s.next_due for s in self.sampled.values()), default=math.inf)
            try:  # until the earliest program is due, or a state changes
                async with asyncio.timeout(min(wake_at - loop.time(), DEFAULT_INTERVAL)):
                    await self._wake.wait()
            except TimeoutError:
                wake_at = -math.inf  # due, or DEFAULT_INTERVAL passed: look at every program

    def _sync(self, now: float) -> None:
        """Follow the supervisor's programs (a reload replaces changed ones)."""
        programs = self._seen = self.programs()
        for name, old in list(self.sampled.items()):
            if programs.get(name) is not old.program:  # removed or replaced by a reload
                self._forget(old)
                del self.sampled[name]
        for name, program in programs.items():
            self._sync_one(name, program, now)

    def _sync_one(self, name: str, program: Program, now: float) -> _Sampled:
        """Follow ``program``'s current run (a new process: counts start afresh)."""
        one = self.sampled.get(name)
        limits = program.spec.limits
        if one is not None and (one.program is not program or limits is not one.limits):
            # Replaced by a reload, or its [limits] updated in place: followed
            # afresh (new interval, counts start over).
            self._forget(one)
            one = None
        if one is None:
            one = self.sampled[name] = self._follow(program, now)
        pid = program.pid if program.state in SAMPLED_STATES else None
        if one.tree is not None and one.tree.pid != pid:
            self._forget(one)
        if pid is not None and one.tree is None:
            # Not read now: the process is being exec'd (reading its /proc
            # files may wait for that), and a crash-looping run is gone before
            # its first sample. `_sample` reads it, while it is still ours.
            one.tree = ProcessTree(pid, look=False)
            one.hysteresis = Hysteresis(one.limits) if one.limits else None
            first = one.interval if one.limits else min(one.interval, FIRST_SAMPLE)
            one.next_due = now + first
        return one

    @staticmethod
    def _follow(program: Program, now: float) -> _Sampled:
        limits = program.spec.limits
        interval = limits.interval if limits else DEFAULT_INTERVAL
        return _Sampled(program, limits, interval, now + interval)

    @staticmethod
    def _forget(one: _Sampled) -> None:
        """The run is gone (or the program is): drop what belonged to it."""
        one.tree = one.hysteresis = None
        one.go = {}
        one.scraping = None
        if one.scraper is not None:
            one.scraper.close()  # a new run is scraped over a new connection
        one.program.observations.run_ended()

    # -- sampling ----------------------------------------------------------------------

    def _tree_refresh_due(self, due: list[_Sampled], now: float) -> bool:
        """Descendants matter most where a limit is enforced (every TREE_REFRESH);
        for figures on show, every FIGURES_TREE_REFRESH is enough."""
        sampled = [s for s in due if s.tree is not None]
        if not sampled:
            return False
        every = TREE_REFRESH if any(s.limits for s in sampled) else FIGURES_TREE_REFRESH
        return now - self._children_at >= every

    async def _refresh_trees(self, now: float) -> None:
        """Look for new descendants of every sampled process. The pass reads a
        file of every process on the machine: a thread does it, off the loop.
        A run that ends meanwhile is caught by the sample (its pid and start
        time no longer match) and by `_evaluate`. When no process was made
        since the last pass, the trees cannot have grown: no pass."""
        self._children_at = now
        newest = last_pid()
        if newest is not None and newest == self._children_last_pid:
            return
        self._children = await asyncio.to_thread(children_map)
        self._children_last_pid = newest
        for one in self.sampled.values():
            if one.tree is not None:
                one.tree.refresh(self._children)

    def _sample(self, due: list[_Sampled], now: float) -> None:
        for one in due:
            one.next_due = now + one.interval  # never a burst to catch up
            if one.tree is None or one.scraping is not None:
                continue
            program = one.program
            if program.pid != one.tree.pid or program.state not in SAMPLED_STATES:
                continue  # the run ended (reaped: its pid may be reused); forgotten at sync
            figures = one.tree.sample(one.sockets)
            if figures is None:
                continue
            url = one.limits.go_metrics if one.limits else None
            if url is None:
                self._evaluate(one, one.tree.pid, figures)
                continue
            if one.scraper is None:
                one.scraper = GoScraper(url, partial(self._scraped, one))
            one.scraping = (one.tree.pid, figures)
            one.scraper.scrape(min(2.0, max(0.5, one.interval)))

    def _scraped(self, one: _Sampled, go: dict[str, int] | None, error: str | None) -> None:
        """A scrape's end (its scraper's callback, in the turn its answer came)."""
        if one.scraping is None:
            return
        (pid, figures), one.scraping = one.scraping, None
        try:
            if go is not None:
                one.go = go
            if error != one.scrape_error:  # log changes, not every failed sample
                if error:
                    logger.warning("{}: cannot read Go metrics: {}", one.program.name, error)
                else:
                    logger.info("{}: Go metrics readable again", one.program.name)
                one.scrape_error = error
            self._evaluate(one, pid, {**figures, **(go or {})}, error)
        except Exception as exc:  # a bug: log it, keep sampling
            logger.opt(exception=exc).error("sampler: internal error after a scrape")

    def _evaluate(
        self, one: _Sampled, pid: int, figures: dict[str, int], error: str | None = None
    ) -> None:
        if one.tree is None or one.tree.pid != pid:
            return  # the process changed while we were scraping
        program = one.program
        shown = program.observations
        shown.figures.update(figures)
        shown.figures.update(one.go)  # the last Go figures known stay on show
        shown.scrape_error = error
        if one.hysteresis is not None:
            breach = one.hysteresis.observe(figures)
            shown.over_limit = one.hysteresis.pending()
            shown.sustain = one.hysteresis.sustain
            if breach is not None:
                self._spawn(self.leaks.act(program, pid, breach), f"leak:{program.name}")
        shown.sampled(program.ctx.clock())
