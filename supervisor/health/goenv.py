"""GOMEMLIMIT and GOMAXPROCS for Go children, from ``limits.rss`` and the
limits of the cgroup gosup (and so every child) runs in.

`GoEnv` is an environment provider (the composition root lists it in
``ctx.env_providers``): asked once per start, it returns the variables for
that start, logs them when they change and shows them in ``gosup status``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from supervisor.config import ProgramSpec
from supervisor.core import cgroup

if TYPE_CHECKING:
    from supervisor.core.program import Program

MEMLIMIT_FRACTION = 0.9  # headroom for what the Go heap limit does not cover (stacks, cgo)
MIB = 1024**2


# -- the cgroup's limits -------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLimits:
    memory: int | None  # bytes
    cpus: float | None  # CPU quota in CPUs (quota / period)


_NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1
_Reader = Callable[[Path], float | None]


def cgroup_limits(root: Path = cgroup.ROOT, proc: Path = cgroup.SELF) -> CgroupLimits:
    """The memory limit and CPU quota of our cgroup (v2, or the v1 controllers), the
    tightest along the path to the root."""
    paths = cgroup.cgroup_paths(proc)
    if not paths:
        return CgroupLimits(None, None)
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
        try:
            value = read(here / filename)
        except (OSError, ValueError, IndexError):
            value = None  # no such controller file here, or not a number: no limit here
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


# -- the variables -------------------------------------------------------------------


def go_env(
    spec: ProgramSpec, limits: CgroupLimits, inherited: Mapping[str, str] = os.environ
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

    def unset(var: str) -> bool:  # no copy of os.environ: this runs before every start
        return var not in spec.environment and var not in inherited

    out: dict[str, str] = {}
    caps = [c for c in (spec.limits.rss if spec.limits else None, limits.memory) if c]
    if unset("GOMEMLIMIT") and caps:
        out["GOMEMLIMIT"] = _go_size(int(min(caps) * MEMLIMIT_FRACTION))
    if unset("GOMAXPROCS") and limits.cpus is not None:
        procs = max(1, math.ceil(limits.cpus))
        if procs < (os.cpu_count() or procs + 1):
            out["GOMAXPROCS"] = str(procs)
    return out


def _go_size(n: int) -> str:
    """A size as GOMEMLIMIT spells it."""
    return f"{n // MIB}MiB" if n >= MIB else f"{n}B"


class GoEnv:
    """The environment provider: ``GoEnv(programs)(spec)`` before each start.

    The cgroup's limits are read again only when our cgroup's path changed
    (``cgroup.cgroup_paths``, itself re-read every ``cgroup.REREAD_AFTER``
    seconds), a reload asked (``cgroup.forget``), or they are older than
    ``cgroup.REREAD_AFTER``: a crash loop of 200 programs does not walk the
    cgroup files at each start.
    """

    def __init__(self, programs: Callable[[], Mapping[str, Program]]) -> None:
        self.programs = programs  # the supervisor's programs now (a reload replaces some)
        self._logged: dict[str, dict[str, str]] = {}
        self._limits: tuple[float, int, dict[str, str], CgroupLimits] | None = None

    def limits(self) -> CgroupLimits:
        """Our cgroup's limits, from the cache while it holds."""
        now, paths = time.monotonic(), cgroup.cgroup_paths()
        cached = self._limits
        if (
            cached is None
            or not 0 <= now - cached[0] <= cgroup.REREAD_AFTER
            or cached[1] != cgroup.generation
            or cached[2] != paths
        ):
            cached = self._limits = (now, cgroup.generation, paths, cgroup_limits())
        return cached[3]

    def __call__(self, spec: ProgramSpec) -> dict[str, str]:
        env = go_env(spec, self.limits())
        program = self.programs().get(spec.name)
        if program is not None:
            program.observations.go_env = env
        if env and self._logged.get(spec.name) != env:
            shown = " ".join(f"{k}={v}" for k, v in env.items())
            logger.info("{}: Go runtime environment {} (go_env)", spec.name, shown)
        self._logged[spec.name] = env
        return env
