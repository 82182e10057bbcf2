"""Resource watermarks: sample every program's process tree (and its Go
runtime), act on a limit only after ``sustain`` samples in a row over it.

One sampler task serves every program. Each program has its own next-due
time on the loop's clock, so programs with different intervals share the
task, and the task sleeps until the earliest one is due (or a program
starts). Programs without a ``[limits]`` section are still sampled every
``DEFAULT_INTERVAL`` for ``gosup status`` and the metrics.

What a sample costs decides how many programs gosup can watch:

- the main process and its known descendants are read from
  ``/proc/PID/stat`` and a listing of ``/proc/PID/fd``; sockets are counted
  from the fd links only when a ``connections`` limit is set (psutil's
  ``net_connections`` parses every socket of the machine);
- descendants are found from one pass over ``/proc/*/stat`` shared by all
  programs and redone at most every ``TREE_REFRESH`` seconds: a Go service's
  tree rarely changes, and a full pass per sample would cost more than all
  the rest (``/proc/PID/task/*/children`` would be cheaper, but needs a
  kernel built with CONFIG_PROC_CHILDREN);
- a Go metrics scrape reuses one kept-alive connection per program.

A finding becomes history first (``limit_exceeded``), then evidence
(``evidence_saved``), then a restart the program's own task carries out
(``Restart(reason="leak")``): not a crash, no backoff, and the counts start
afresh for the new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from supervisor import control, daemon, goruntime
from supervisor.config import Evidence, LimitsSpec, ProgramSpec
from supervisor.events import now_rfc3339
from supervisor.program import CommandError, Program, Restart
from supervisor.states import ProcessState

S = ProcessState
DEFAULT_INTERVAL = 5.0  # programs without [limits]: figures for status and metrics
TREE_REFRESH = 10.0  # how often descendants are looked for
EARLY = 0.1  # a sample may be taken this fraction of its interval early
DUMP_TIMEOUT = 10.0  # a goroutine dump of a big program takes a while to write
AGE = "last_sample_age_s"
WATCHED_STATES = frozenset({S.STARTING, S.RUNNING})
# config key of a limit -> the figure it applies to
LIMIT_FIGURES = {
    "rss": "rss_bytes",
    "open_fds": "open_fds",
    "threads": "threads",
    "connections": "connections",
    "goroutines": "goroutines",
    "heap_inuse": "heap_inuse_bytes",
}
PROCESS_FIGURES = (*LIMIT_FIGURES.values(), "scrape_error", "over_limit", AGE)


class Figures(dict[str, Any]):
    """``program.figures`` whose sample age is worked out when it is read:
    ``status()`` copies the dict, so a stored age would be stale at once."""

    def __init__(self, initial: Mapping[str, Any], clock: Callable[[], float]) -> None:
        super().__init__(initial)
        self.clock = clock
        self.sampled_at: float | None = None

    def _refresh(self) -> None:
        if self.sampled_at is not None:
            super().__setitem__(AGE, round(self.clock() - self.sampled_at, 3))

    def keys(self) -> Any:
        self._refresh()
        return super().keys()

    def items(self) -> Any:
        self._refresh()
        return super().items()

    def __iter__(self) -> Any:
        self._refresh()
        return super().__iter__()

    def __getitem__(self, key: str) -> Any:
        if key == AGE:
            self._refresh()
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key == AGE:
            self._refresh()
        return super().get(key, default)


# -- limits with hysteresis ----------------------------------------------------------


@dataclass(frozen=True)
class Breach:
    metric: str  # the config key: rss, goroutines, ...
    value: int
    limit: int
    samples: int  # consecutive samples over the limit
    values: tuple[int, ...]  # those samples, oldest first


class Hysteresis:
    """Counts consecutive samples over each limit of one process (monit's "for N
    cycles"); fires once, when a count reaches ``sustain``. A sample that lacks
    a figure (a failed scrape) neither counts nor breaks the run: an endpoint
    that stops answering is never a reason to kill, nor an alibi for a leak."""

    def __init__(self, limits: LimitsSpec) -> None:
        self.sustain = limits.sustain
        self.limits = {m: v for m in LIMIT_FIGURES if (v := getattr(limits, m)) is not None}
        self.runs: dict[str, list[int]] = {m: [] for m in self.limits}
        self.fired = False

    def observe(self, figures: Mapping[str, Any]) -> Breach | None:
        if self.fired:
            return None
        for metric, limit in self.limits.items():
            value = figures.get(LIMIT_FIGURES[metric])
            if value is None:
                continue
            run = self.runs[metric]
            if value > limit:
                run.append(int(value))
                del run[: -self.sustain]
            else:
                run.clear()
        for metric, run in self.runs.items():
            if len(run) >= self.sustain:
                self.fired = True
                return Breach(metric, run[-1], self.limits[metric], len(run), tuple(run))
        return None

    def pending(self) -> dict[str, int]:
        """Limits currently over, with how many samples in a row."""
        return {m: len(run) for m, run in self.runs.items() if run}


# -- the process tree ----------------------------------------------------------------


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, from one pass over /proc/*/stat."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            ppid = int(data[data.rfind(b")") + 2 :].split(maxsplit=2)[1])
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours to read
        out.setdefault(ppid, []).append(int(name))
    return out


class ProcessTree:
    """One child's process tree, summed: the main process every sample, its
    descendants as last found by `refresh`.

    Each process is read from ``/proc/PID/stat`` (state, threads and rss in one
    read) and a listing of ``/proc/PID/fd``: half the cost of psutil's
    oneshot() with memory_info/num_threads/num_fds, which reads three files.
    A process is known by pid and start time, so a reused pid is never counted.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.procs: dict[int, int] = {}  # pid -> start time (clock ticks after boot)
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.procs[pid] = _read_stat(pid)[3]

    def refresh(self, children: Mapping[int, list[int]]) -> None:
        found, pending = set(), [self.pid]
        while pending:
            pid = pending.pop()
            found.add(pid)
            pending.extend(c for c in children.get(pid, ()) if c not in found)
        for pid in found - self.procs.keys():
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.procs[pid] = _read_stat(pid)[3]

    def sample(self, sockets: bool) -> dict[str, int] | None:
        """Summed figures; None when the main process is gone (it is exiting)."""
        totals = dict.fromkeys(("rss_bytes", "open_fds", "threads"), 0)
        if sockets:
            totals["connections"] = 0
        for pid, started in list(self.procs.items()):
            try:
                state, threads, rss, start = _read_stat(pid)
                if state == b"Z" or start != started:
                    raise ProcessLookupError(pid)  # exited, or the pid is someone else's now
                fds, socks = _fd_counts(pid, sockets)
            except (OSError, ValueError, IndexError):
                if pid == self.pid:
                    return None
                del self.procs[pid]  # a descendant vanished mid-sample
                continue
            totals["rss_bytes"] += rss
            totals["threads"] += threads
            totals["open_fds"] += fds
            if sockets:
                totals["connections"] += socks
        return totals


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _read_stat(pid: int) -> tuple[bytes, int, int, int]:
    """(state, threads, rss bytes, start time) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # After "pid (comm) " the fields count from 3 (state); comm may hold spaces.
    fields = data[data.rfind(b")") + 2 :].split()
    return fields[0], int(fields[17]), int(fields[21]) * _PAGE, int(fields[19])


def _fd_counts(pid: int, sockets: bool) -> tuple[int, int]:
    """Open fds, and (only when asked: a readlink each) how many are sockets."""
    fd_dir = f"/proc/{pid}/fd"
    names = os.listdir(fd_dir)
    if not sockets:
        return len(names), 0
    count = 0
    for name in names:
        with contextlib.suppress(OSError):
            count += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
    return len(names), count


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
    client: goruntime.HttpClient | None = None  # the kept-alive connection to go_metrics

    @property
    def sockets(self) -> bool:
        return self.limits is not None and self.limits.connections is not None


class ResourceSampler:
    """The supervisor-wide sampler; also derives the Go env and serves ``dump``."""

    def __init__(self, sup: daemon.Supervisor) -> None:
        self.sup = sup
        self.dumps_dir = sup.config.supervisor.state_dir / "dumps"
        self.watches: dict[str, _Watch] = {}
        self.enabled = os.environ.get("GOSUP_SAMPLING", "1") != "0"
        self._children: dict[int, list[int]] = {}
        self._children_at = -math.inf
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._go_env_logged: dict[str, dict[str, str]] = {}
        previous = sup.ctx.extra_env
        sup.ctx.extra_env = lambda spec: {**previous(spec), **self.go_env(spec)}

    async def start(self) -> None:
        self.sup.state_listeners.append(self._on_state)
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

    def _on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
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
        programs = self.sup.programs
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
            watch.client = goruntime.HttpClient(url)
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
        if isinstance(shown, Figures):
            shown.sampled_at = shown.clock()
        if watch.hysteresis is None:
            return
        breach = watch.hysteresis.observe(figures)
        pending = watch.hysteresis.pending()
        if pending:
            shown["over_limit"] = pending
        else:
            shown.pop("over_limit", None)
        if breach is not None:
            self._spawn(self._act(watch.program, pid, breach))

    # -- acting on a leak ------------------------------------------------------------

    async def _act(self, program: Program, pid: int, breach: Breach) -> None:
        """limit_exceeded -> evidence -> restart (reason leak)."""
        limits = program.spec.limits
        assert limits is not None
        self.sup.history.record(
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
                await self._restart_with_sigquit(program, limits)
            else:
                await program.request(Restart(reason="leak"))
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
            if isinstance(result, goruntime.ScrapeError):
                logger.warning("{}: no {} evidence: {}", program.name, kind, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                self._saved(program, limits, result, kind)

    async def _restart_with_sigquit(self, program: Program, limits: LimitsSpec) -> None:
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
            await program.request(Restart(reason="leak", stop_signal=signal.SIGQUIT))
        finally:
            capture.end()

    def _saved(
        self, program: Program, limits: LimitsSpec, path: Path, kind: str, **extra: Any
    ) -> None:
        self.sup.history.record("evidence_saved", program.name, path=str(path), kind=kind, **extra)
        logger.info("{}: {} evidence saved to {}", program.name, kind, path)
        goruntime.prune_dumps(self.dumps_dir, program.name, limits.dump_keep)

    # -- Go runtime environment, dump on request -----------------------------------

    def go_env(self, spec: ProgramSpec) -> dict[str, str]:
        """GOMEMLIMIT/GOMAXPROCS for the next start of ``spec`` (ctx.extra_env)."""
        env = goruntime.go_env(spec, goruntime.cgroup_limits())
        program = self.sup.programs.get(spec.name)
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
        program = self.sup.programs.get(name)
        if program is None:
            raise control.RequestError(f"unknown program {name!r}")
        limits = program.spec.limits
        if limits is None or limits.go_metrics is None:
            raise control.RequestError(
                f"{name} has no go_metrics URL: set [programs.{name}.limits] go_metrics "
                "(the dump is read from /debug/pprof/goroutine on its host:port)"
            )
        if program.state not in WATCHED_STATES:
            raise control.RequestError(f"{name} is not running ({program.state.value})")
        url = goruntime.pprof_url(limits.go_metrics, goruntime.GOROUTINE_DUMP_PATH)
        path = self.dumps_dir / f"{goruntime.dump_stem(self.dumps_dir, name)}-goroutines.txt"
        try:
            await goruntime.fetch_dump(url, path, limits.dump_max_size, DUMP_TIMEOUT)
        except goruntime.ScrapeError as exc:
            raise control.RequestError(f"dump {name}: {exc}") from None
        self._saved(program, limits, path, "pprof", reason="operator")
        return {"path": str(path)}


_services: weakref.WeakKeyDictionary[daemon.Supervisor, ResourceSampler] = (
    weakref.WeakKeyDictionary()
)


def _factory(sup: daemon.Supervisor) -> ResourceSampler:
    service = _services[sup] = ResourceSampler(sup)
    return service


@control.register("dump")
async def handle_dump(sup: daemon.Supervisor, req: control.Request) -> Any:
    name = req.get("name", str)
    if name is None:
        raise control.RequestError("dump: name the program to dump")
    service = _services.get(sup)
    if service is None:
        raise control.RequestError("dump: resource sampling is not set up")
    return await service.dump(name)


daemon.SERVICE_FACTORIES.append(_factory)
