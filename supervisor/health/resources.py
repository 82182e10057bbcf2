"""Resource watermarks: sample every program's process tree (and its Go
runtime), act on a limit only after ``sustain`` samples in a row over it.

One sampler task serves every program. Each program has its own next-due
time on the loop's clock, so programs with different intervals share the
task, and the task sleeps until the earliest one is due (or a program
starts). Programs without a ``[limits]`` section are still sampled every
``DEFAULT_INTERVAL`` for ``gosup status`` and the metrics.

A sample reads the process tree from /proc (see `supervisor.health.sampling` for
what that costs and why), looks for new descendants at most every
``TREE_REFRESH`` seconds, and scrapes a program's Go metrics over one
kept-alive connection.

A finding becomes history first (``limit_exceeded``), then evidence
(``evidence_saved``), then a restart the program's own task carries out
(``Restart(reason="leak")``): not a crash, no backoff, and the counts start
afresh for the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from supervisor.config import Evidence, LimitsSpec, ProgramSpec
from supervisor.core.program import CommandError, Program, Restart
from supervisor.core.states import ProcessState
from supervisor.health import evidence, gohttp, goruntime
from supervisor.health.sampling import (
    AGE,
    LIMIT_FIGURES,
    Breach,
    Figures,
    Hysteresis,
    ProcessTree,
    children_map,
)
from supervisor.history import History, now_rfc3339
from supervisor.protocol import RequestError

S = ProcessState
DEFAULT_INTERVAL = 5.0  # programs without [limits]: figures for status and metrics
TREE_REFRESH = 10.0  # how often descendants are looked for
EARLY = 0.1  # a sample may be taken this fraction of its interval early
DUMP_TIMEOUT = 10.0  # a goroutine dump of a big program takes a while to write
WATCHED_STATES = frozenset({S.STARTING, S.RUNNING})
OVER_FIGURES = ("over_limit", "sustain")  # a run building up, and the count that fires
PROCESS_FIGURES = (*LIMIT_FIGURES.values(), "scrape_error", *OVER_FIGURES, AGE)


# -- the sampler service -------------------------------------------------------------


@dataclass
class _Watch:
    program: Program
    limits: LimitsSpec | None
    interval: float
    next_due: float
    tree: ProcessTree | None = None
    hysteresis: Hysteresis | None = None
    scraping: bool = False
    scrape_error: str | None = None
    go: dict[str, int] = field(default_factory=dict)
    client: gohttp.HttpClient | None = None  # the kept-alive connection to go_metrics

    @property
    def sockets(self) -> bool:
        return self.limits is not None and self.limits.connections is not None


class ResourceSampler:
    """The supervisor-wide sampler; also derives the Go env and serves ``dump``."""

    def __init__(
        self,
        programs: Callable[[], Mapping[str, Program]],
        history: History,
        dumps_dir: Path,
        *,
        enabled: bool = True,
    ) -> None:
        self.programs = programs  # the supervisor's programs now (a reload replaces some)
        self.history = history
        self.dumps_dir = dumps_dir
        self.watches: dict[str, _Watch] = {}
        self.enabled = enabled
        self._children: dict[int, list[int]] = {}
        self._children_at = -math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._go_env_logged: dict[str, dict[str, str]] = {}

    async def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sampler")
        else:
            logger.warning("resource sampling is off (GOSUP_SAMPLING=0): no limits are enforced")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for watch in self.watches.values():
            if watch.client is not None:
                await watch.client.aclose()
            self._forget(watch)

    def on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
        """A state listener: wakes the sampler for a process to watch or forget."""
        if new in WATCHED_STATES or old in WATCHED_STATES:
            self._wake.set()  # a new process to watch, or one to forget

    # -- scheduling --------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            try:
                self._sync(now)
                # Up to EARLY x interval ahead of time: programs fall into batches
                # that share one wake-up (and one tree refresh) instead of waking
                # the loop once per program.
                due = [w for w in self.watches.values() if w.next_due <= now + EARLY * w.interval]
                if due:
                    self._sample(due, now)
            except Exception as exc:  # a bug: log it, keep sampling the others next time
                logger.opt(exception=exc).error("sampler: internal error")
                for watch in self.watches.values():
                    watch.next_due = max(watch.next_due, now + watch.interval)
            wake_at = min((w.next_due for w in self.watches.values()), default=math.inf)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wake_at - loop.time(), DEFAULT_INTERVAL)):
                    await self._wake.wait()

    def _sync(self, now: float) -> None:
        """Follow the supervisor's programs (a reload replaces changed ones)."""
        programs = self.programs()
        for name, old in list(self.watches.items()):
            if programs.get(name) is not old.program:  # removed, or replaced by a reload
                self._forget(old)
                del self.watches[name]
        for name, program in programs.items():
            watch = self.watches.get(name) or self._watch(program, now)
            self.watches[name] = watch
            pid = program.pid if program.state in WATCHED_STATES else None
            if watch.tree is not None and watch.tree.pid != pid:
                self._forget(watch)
            if pid is not None and watch.tree is None:  # a new process: counts start afresh
                watch.tree = ProcessTree(pid)
                watch.tree.refresh(self._children)
                watch.hysteresis = Hysteresis(watch.limits) if watch.limits else None
                watch.next_due = now + watch.interval

    def _watch(self, program: Program, now: float) -> _Watch:
        if not isinstance(program.figures, Figures):
            program.figures = Figures(program.figures, program.ctx.clock)
        limits = program.spec.limits
        interval = limits.interval if limits else DEFAULT_INTERVAL
        return _Watch(program, limits, interval, now + interval)

    def _forget(self, watch: _Watch) -> None:
        watch.tree = watch.hysteresis = None
        watch.go = {}
        if watch.client is not None:
            watch.client.close()
        figures = watch.program.figures
        for key in PROCESS_FIGURES:
            figures.pop(key, None)
        if isinstance(figures, Figures):
            figures.sampled_at = None

    def _sample(self, due: list[_Watch], now: float) -> None:
        if now - self._children_at >= TREE_REFRESH and any(w.tree for w in due):
            self._children, self._children_at = children_map(), now
            for watch in self.watches.values():
                if watch.tree is not None:
                    watch.tree.refresh(self._children)
        for watch in due:
            watch.next_due = now + watch.interval  # never a burst to catch up
            if watch.tree is None or watch.scraping:
                continue
            figures = watch.tree.sample(watch.sockets)
            if figures is None:
                continue
            url = watch.limits.go_metrics if watch.limits else None
            if url is None:
                self._evaluate(watch, watch.tree.pid, figures)
            else:
                watch.scraping = True
                self._spawn(self._scrape(watch, watch.tree.pid, figures, url))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.opt(exception=exc).error("sampler: internal error")

    async def _scrape(self, watch: _Watch, pid: int, figures: dict[str, int], url: str) -> None:
        timeout = min(2.0, max(0.5, watch.interval))
        error = None
        if watch.client is None:
            watch.client = gohttp.HttpClient(url)
        try:
            watch.go = await goruntime.scrape(url, timeout, watch.client)
        except goruntime.ScrapeError as exc:
            error = str(exc)
        finally:
            watch.scraping = False
        if error != watch.scrape_error:  # log changes, not every failed sample
            if error:
                logger.warning("{}: cannot read Go metrics: {}", watch.program.name, error)
            else:
                logger.info("{}: Go metrics readable again", watch.program.name)
            watch.scrape_error = error
        go = {} if error else watch.go
        self._evaluate(watch, pid, {**figures, **go}, error)

    def _evaluate(
        self, watch: _Watch, pid: int, figures: dict[str, int], error: str | None = None
    ) -> None:
        if watch.tree is None or watch.tree.pid != pid:
            return  # the process changed while we were scraping
        shown = watch.program.figures
        shown.update(figures, **watch.go)  # the last Go figures known stay on show
        if error:
            shown["scrape_error"] = error
        else:
            shown.pop("scrape_error", None)
        if watch.hysteresis is None:
            self._count(shown)
            return
        breach = watch.hysteresis.observe(figures)
        pending = watch.hysteresis.pending()
        if pending:
            shown.update(over_limit=pending, sustain=watch.hysteresis.sustain)
        else:
            for key in OVER_FIGURES:
                shown.pop(key, None)
        if breach is not None:
            self._spawn(self._act(watch.program, pid, breach))
        self._count(shown)

    @staticmethod
    def _count(shown: dict[str, Any]) -> None:
        if isinstance(shown, Figures):
            shown.sampled_at = shown.clock()
            shown.samples += 1

    # -- acting on a leak ------------------------------------------------------------

    async def _act(self, program: Program, pid: int, breach: Breach) -> None:
        """limit_exceeded -> evidence -> restart (reason leak)."""
        limits = program.spec.limits
        assert limits is not None
        self.history.record(
            "limit_exceeded", program.name, metric=breach.metric, value=breach.value,
            limit=breach.limit, samples=breach.samples, values=list(breach.values), pid=pid,
        )  # fmt: skip
        program.figures["limit_exceeded"] = {
            "metric": breach.metric, "value": breach.value, "limit": breach.limit,
            "samples": breach.samples, "ts": now_rfc3339(),
        }  # fmt: skip
        logger.warning(
            "{}: {} {} over its limit {} for {} samples: restarting (pid {})",
            program.name, breach.metric, breach.value, breach.limit, breach.samples, pid,
        )  # fmt: skip
        if limits.evidence is Evidence.PPROF:
            await self._pprof_evidence(program, limits)
        if program.pid != pid:
            logger.info("{}: pid {} is gone already: no leak restart", program.name, pid)
            return
        try:
            if limits.evidence is Evidence.SIGQUIT:
                await self._restart_with_sigquit(program, limits, pid)
            else:
                await program.request(Restart(reason="leak", pid=pid))
        except CommandError as exc:
            logger.warning("{}: leak restart: {}", program.name, exc)

    async def _pprof_evidence(self, program: Program, limits: LimitsSpec) -> None:
        if limits.go_metrics is None:
            logger.info("{}: no go_metrics URL: no pprof evidence", program.name)
            return
        stem = goruntime.dump_stem(self.dumps_dir, program.name)
        wanted = (
            (goruntime.GOROUTINE_DUMP_PATH, "pprof", "goroutines.txt"),
            (goruntime.HEAP_PROFILE_PATH, "pprof_heap", "heap.pb.gz"),
        )
        # Both at once: an overloaded program delays its restart DUMP_TIMEOUT at most.
        fetched = await asyncio.gather(
            *(
                goruntime.fetch_dump(
                    goruntime.pprof_url(limits.go_metrics, path),
                    self.dumps_dir / f"{stem}-{suffix}",
                    limits.dump_max_size,
                    DUMP_TIMEOUT,
                )
                for path, _, suffix in wanted
            ),
            return_exceptions=True,
        )
        for (_, kind, _), result in zip(wanted, fetched, strict=True):
            # Unreadable, or unwritable (disk full, dumps/ unusable): the restart
            # must happen all the same, the evidence is a bonus.
            if isinstance(result, goruntime.ScrapeError | OSError):
                evidence.failed(self.history, program.name, kind, str(result))
            elif isinstance(result, BaseException):
                raise result
            else:
                self._saved(program, limits, result, kind)

    async def _restart_with_sigquit(self, program: Program, limits: LimitsSpec, pid: int) -> None:
        """SIGQUIT as the stop signal of the leak restart: the Go runtime writes
        every goroutine's stack to stderr and exits; the program's task sees a
        requested stop, not a crash. The capture ends when the child is gone and
        its output drained, and is saved before the new process starts."""
        path = self.dumps_dir / f"{goruntime.dump_stem(self.dumps_dir, program.name)}-sigquit.txt"
        capture = goruntime.StderrCapture(
            program,
            path,
            limits.dump_max_size,
            lambda p: self._saved(program, limits, p, "sigquit"),
        )
        capture.begin()
        try:
            await program.request(Restart(reason="leak", stop_signal=signal.SIGQUIT, pid=pid))
        finally:
            capture.end()

    def _saved(
        self, program: Program, limits: LimitsSpec, path: Path, kind: str, **extra: Any
    ) -> None:
        if evidence.record(self.history, program.name, path, kind, **extra):
            goruntime.prune_dumps(self.dumps_dir, program.name, limits.dump_keep)

    # -- Go runtime environment, dump on request -----------------------------------

    def go_env(self, spec: ProgramSpec) -> dict[str, str]:
        """An environment provider: GOMEMLIMIT/GOMAXPROCS for the next start of ``spec``."""
        env = goruntime.go_env(spec, goruntime.cgroup_limits())
        program = self.programs().get(spec.name)
        if program is not None:
            if env:
                program.figures["go_env"] = env
            else:
                program.figures.pop("go_env", None)
        if env and self._go_env_logged.get(spec.name) != env:
            shown = " ".join(f"{k}={v}" for k, v in env.items())
            logger.info("{}: Go runtime environment {} (go_env)", spec.name, shown)
        self._go_env_logged[spec.name] = env
        return env

    async def dump(self, name: str) -> dict[str, Any]:
        """A goroutine dump of ``name`` now, over pprof (the process keeps running)."""
        program = self.programs().get(name)
        if program is None:
            raise RequestError(f"unknown program {name!r}")
        limits = program.spec.limits
        if limits is None or limits.go_metrics is None:
            raise RequestError(
                f"{name} has no go_metrics URL: set [programs.{name}.limits] go_metrics "
                "(the dump is read from /debug/pprof/goroutine on its host:port)"
            )
        if program.state not in WATCHED_STATES:
            raise RequestError(f"{name} is not running ({program.state.value})")
        url = goruntime.pprof_url(limits.go_metrics, goruntime.GOROUTINE_DUMP_PATH)
        path = self.dumps_dir / f"{goruntime.dump_stem(self.dumps_dir, name)}-goroutines.txt"
        try:
            await goruntime.fetch_dump(url, path, limits.dump_max_size, DUMP_TIMEOUT)
        except goruntime.ScrapeError as exc:
            raise RequestError(f"dump {name}: {exc}") from None
        self._saved(program, limits, path, "pprof", reason="operator")
        return {"path": str(path)}
