"""The Go runtime seen from outside: metrics, goroutine dumps, GOMEMLIMIT/GOMAXPROCS.

Metrics come from whatever the child already serves at ``go_metrics``, told
apart by the answer itself, not by the URL: a JSON object is expvar
(``/debug/vars``: ``memstats.HeapInuse`` and a ``goroutines`` variable when the
program publishes one), a ``goroutine profile: total N`` first line is pprof
(``/debug/pprof/goroutine?debug=1``), anything else is read as Prometheus text
(``go_goroutines``, ``go_memstats_heap_inuse_bytes``).

Answers are read with `supervisor.health.gohttp`, a minimal asyncio HTTP client; a
sampler keeps one connection per program alive between scrapes. A failed
scrape is an error to show, never a reason to kill: callers catch
`ScrapeError`.

Dumps (pprof and SIGQUIT) are written under ``<state_dir>/dumps/`` as
``<program>-<UTC stamp>-<kind>.<ext>``, capped in size, the oldest pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from loguru import logger

from supervisor.config import ProgramSpec
from supervisor.core.states import ProcessState
from supervisor.health.gohttp import HttpClient, http_get
from supervisor.health.gohttp import ScrapeError as ScrapeError

if TYPE_CHECKING:
    from supervisor.core.program import Program

METRICS_MAX_BYTES = 4 * 1024**2
GOROUTINE_DUMP_PATH = "/debug/pprof/goroutine?debug=2"
HEAP_PROFILE_PATH = "/debug/pprof/heap"
TRUNCATED_NOTE = b"\n\n[gosup: dump truncated at dump_max_size]\n"
MEMLIMIT_FRACTION = 0.9  # headroom for what the Go heap limit does not cover (stacks, cgo)
MIB = 1024**2


# -- metrics ---------------------------------------------------------------------

_PROM_LINE = re.compile(
    r"^(go_goroutines|go_memstats_heap_inuse_bytes)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE
)
_PROM_KEYS = {"go_goroutines": "goroutines", "go_memstats_heap_inuse_bytes": "heap_inuse_bytes"}
_PPROF_TOTAL = re.compile(rb"^goroutine profile: total (\d+)")


def parse_metrics(body: bytes) -> dict[str, int]:
    """``goroutines`` and/or ``heap_inuse_bytes`` from any of the three formats."""
    text = body.lstrip()
    if text.startswith(b"{"):
        return _parse_expvar(text)
    match = _PPROF_TOTAL.match(text)
    if match is not None:
        return {"goroutines": int(match[1])}
    return _parse_prometheus(text)


def _parse_expvar(text: bytes) -> dict[str, int]:
    try:
        data = json.loads(text)
    except ValueError:
        raise ScrapeError("answer looks like JSON but does not parse") from None
    found: dict[str, int] = {}
    memstats = data.get("memstats") if isinstance(data, dict) else None
    if isinstance(memstats, dict) and _is_count(memstats.get("HeapInuse")):
        found["heap_inuse_bytes"] = int(memstats["HeapInuse"])
    if isinstance(data, dict) and _is_count(data.get("goroutines")):
        found["goroutines"] = int(data["goroutines"])
    if not found:
        raise ScrapeError("expvar answer has neither memstats.HeapInuse nor goroutines")
    return found


def _parse_prometheus(text: bytes) -> dict[str, int]:
    found: dict[str, int] = {}
    for name, value in _PROM_LINE.findall(text.decode("utf-8", "replace")):
        with contextlib.suppress(ValueError, OverflowError):
            number = float(value)
            if math.isfinite(number) and number >= 0:
                found[_PROM_KEYS[name]] = int(number)
    if not found:
        raise ScrapeError("no go_goroutines or go_memstats_heap_inuse_bytes in the answer")
    return found


def _is_count(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


async def scrape(url: str, timeout: float, client: HttpClient | None = None) -> dict[str, int]:
    """The Go figures at ``url``; ScrapeError when unreachable, slow or not Go metrics.
    With ``client`` (made for ``url``) its kept-alive connection is used."""
    if client is None:
        response = await http_get(url, timeout, METRICS_MAX_BYTES)
    else:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        response = await client.get(target, timeout, METRICS_MAX_BYTES)
    if response.status != 200:
        raise ScrapeError(f"{url}: HTTP {response.status}")
    try:
        return parse_metrics(response.body)
    except ScrapeError as exc:
        raise ScrapeError(f"{url}: {exc}") from None


def pprof_url(go_metrics: str, path: str) -> str:
    """``path`` (with its query) on the host:port of the go_metrics URL."""
    parts = urlsplit(go_metrics)
    return f"{parts.scheme}://{parts.netloc}{path}"


# -- dumps -----------------------------------------------------------------------

_DUMP_NAME = re.compile(r"^(?P<program>.+)-(?P<stamp>\d{8}T\d{6}\.\d{3}Z(?:\.\d+)?)-[a-z_]+\.")


def dump_stem(dumps_dir: Path, program: str) -> str:
    """A fresh ``<program>-<stamp>`` for one dump's files (unique even within one ms)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    stem, n = f"{program}-{stamp}", 1
    while any(dumps_dir.glob(f"{stem}-*")):
        n += 1
        stem = f"{program}-{stamp}.{n}"
    return stem


def write_dump(path: Path, data: bytes, max_size: int, truncated: bool = False) -> Path:
    """Write a dump atomically (0600), cut to ``max_size`` bytes with a note when longer."""
    if len(data) > max_size or truncated:
        data = data[: max(0, max_size - len(TRUNCATED_NOTE))]
        if not path.name.endswith(".gz"):  # a note would corrupt a binary profile
            data += TRUNCATED_NOTE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)
    return path


def prune_dumps(dumps_dir: Path, program: str, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` dumps of ``program`` (a dump = files of one stem)."""
    stems: dict[str, list[Path]] = {}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for path in dumps_dir.iterdir():
            match = _DUMP_NAME.match(path.name)
            if match is not None and match["program"] == program:
                stems.setdefault(f"{match['program']}-{match['stamp']}", []).append(path)
    removed = []
    for stem in sorted(stems, key=_stamp_order)[:-keep]:
        for path in stems[stem]:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:  # not ours to remove: leave it, prune the rest
                logger.warning("dumps: cannot remove {}: {}", path, exc)
                continue
            removed.append(path)
    return removed


def _stamp_order(stem: str) -> tuple[str, int]:
    match = re.search(r"-(\d{8}T\d{6}\.\d{3}Z)(?:\.(\d+))?$", stem)
    return (match[1], int(match[2] or 1)) if match else ("", 0)


async def fetch_dump(url: str, path: Path, max_size: int, timeout: float) -> Path:
    """Save what ``url`` answers (a pprof profile) at ``path``; ScrapeError on failure."""
    response = await http_get(url, timeout, max_size)
    if response.status != 200:
        raise ScrapeError(f"{url}: HTTP {response.status}")
    return await asyncio.to_thread(write_dump, path, response.body, max_size, response.truncated)


def goroutine_traces(stderr: bytes) -> bytes:
    """The SIGQUIT dump in a captured stretch of stderr (what the runtime wrote from
    its ``SIGQUIT: quit`` header on), or everything when the header is not there."""
    start = stderr.find(b"SIGQUIT: quit")
    return stderr[start:] if start >= 0 else stderr


class StderrCapture:
    """A program's stderr from now until its current child is gone, saved as a
    SIGQUIT goroutine dump.

    Installed before the SIGQUIT, as a tap on the program's stderr stream. The
    program leaves STOPPING only after the child exited and its pipes were
    drained, so everything the runtime wrote has passed the tap by then; the
    dump is written right there, synchronously, so that ``evidence_saved``
    precedes the next ``started`` in the history and the new child's output
    never reaches the tap.
    """

    def __init__(
        self, program: Program, path: Path, max_size: int, on_saved: Callable[[Path], None]
    ) -> None:
        self.program, self.path, self.max_size, self.on_saved = program, path, max_size, on_saved
        self.data = bytearray()
        self.truncated = False
        self.done = False
        self.stopped = False  # the child went, so whatever SIGQUIT made it write is here

    def begin(self) -> None:
        self.program.output.stderr.taps.append(self._tap)
        self.program.state_listeners.append(self._on_state)

    def end(self) -> None:
        """Stop capturing and save what was captured (idempotent)."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(ValueError):
            self.program.output.stderr.taps.remove(self._tap)
        # Called from inside the program's listener loop: leave the list alone
        # until that loop is over, or the next listener would be skipped.
        asyncio.get_running_loop().call_soon(self._unlisten)
        if not self.stopped:  # the restart was refused: no SIGQUIT, what came is no dump
            return
        traces = goroutine_traces(bytes(self.data))
        if not traces.strip():
            logger.warning("{}: SIGQUIT produced no goroutine dump", self.program.name)
            return
        try:
            path = write_dump(self.path, traces, self.max_size, self.truncated)
        except OSError as exc:
            logger.warning("{}: cannot save the SIGQUIT dump: {}", self.program.name, exc)
            return
        self.on_saved(path)

    def _unlisten(self) -> None:
        with contextlib.suppress(ValueError):
            self.program.state_listeners.remove(self._on_state)

    def _tap(self, data: bytes) -> None:
        room = self.max_size - len(self.data)
        self.data += data[: max(room, 0)]
        self.truncated |= len(data) > room

    def _on_state(self, program: Program, old: ProcessState, new: ProcessState) -> None:
        if old is ProcessState.STOPPING or new in (ProcessState.EXITED, ProcessState.STOPPED):
            self.stopped = True
            self.end()


# -- GOMEMLIMIT / GOMAXPROCS -----------------------------------------------------


@dataclass(frozen=True)
class CgroupLimits:
    memory: int | None  # bytes
    cpus: float | None  # CPU quota in CPUs (quota / period)


_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1
_Reader = Callable[[Path], float | None]


def cgroup_limits(
    root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self")
) -> CgroupLimits:
    """The memory limit and CPU quota of our cgroup (v2, or the v1 controllers), the
    tightest along the path to the root. Children run in gosup's cgroup."""
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return CgroupLimits(None, None)
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path.strip("/")
    if (root / "cgroup.controllers").exists():  # a pure v2 hierarchy
        base = paths.get("", "")
        memory = _tightest(root, base, "memory.max", _v2_memory)
        cpus = _tightest(root, base, "cpu.max", _v2_cpus)
    else:
        memory = _tightest(
            root / "memory", paths.get("memory", ""), "memory.limit_in_bytes", _v1_memory
        )
        cpus = _tightest(_v1_cpu_root(root), paths.get("cpu", ""), "cpu.cfs_quota_us", _v1_cpus)
    return CgroupLimits(int(memory) if memory is not None else None, cpus)


def _v1_cpu_root(root: Path) -> Path:
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        if (root / name).is_dir():
            return root / name
    return root / "cpu"


def _tightest(mount: Path, rel: str, filename: str, read: _Reader) -> float | None:
    """The smallest limit from our cgroup up to the mount root. In a container the
    mount root may already be our cgroup (namespaced): a missing path means the root."""
    here = mount / rel if rel and (mount / rel).is_dir() else mount
    found: float | None = None
    while True:
        with contextlib.suppress(OSError, ValueError, IndexError):
            value = read(here / filename)
            if value is not None and (found is None or value < found):
                found = value
        if here == mount or mount not in here.parents:
            return found
        here = here.parent


def _v2_memory(path: Path) -> float | None:
    text = path.read_text().strip()
    return None if text == "max" else int(text)


def _v2_cpus(path: Path) -> float | None:
    quota, period = path.read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _v1_memory(path: Path) -> float | None:
    value = int(path.read_text().strip())
    return None if value >= _NO_LIMIT else value


def _v1_cpus(path: Path) -> float | None:
    quota = int(path.read_text().strip())
    period = int((path.parent / "cpu.cfs_period_us").read_text().strip())
    return None if quota <= 0 else quota / period


def go_env(
    spec: ProgramSpec, cgroup: CgroupLimits, inherited: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """GOMEMLIMIT and GOMAXPROCS for a child whose environment does not set them.

    GOMEMLIMIT is ~90% of the lower of ``limits.rss`` and the cgroup memory
    limit, so the Go GC works harder before the kernel or our rss limit kills
    it. GOMAXPROCS is the cgroup CPU quota rounded up, when that is below the
    machine's CPU count (older runtimes size themselves by the CPU count and
    get throttled).
    """
    if not spec.go_env:
        return {}
    env = {**inherited, **spec.environment}
    out: dict[str, str] = {}
    caps = [c for c in (spec.limits.rss if spec.limits else None, cgroup.memory) if c]
    if "GOMEMLIMIT" not in env and caps:
        out["GOMEMLIMIT"] = _go_size(int(min(caps) * MEMLIMIT_FRACTION))
    if "GOMAXPROCS" not in env and cgroup.cpus is not None:
        procs = max(1, math.ceil(cgroup.cpus))
        if procs < (os.cpu_count() or procs + 1):
            out["GOMAXPROCS"] = str(procs)
    return out


def _go_size(n: int) -> str:
    """A size as GOMEMLIMIT spells it."""
    return f"{n // MIB}MiB" if n >= MIB else f"{n}B"
