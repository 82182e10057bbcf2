"""Our cgroup, as ``/proc/self/cgroup`` names it: the one parser for everything
that looks at it (OOM kill counts here in core, memory and CPU limits for the
Go environment in `supervisor.health.goenv`). Children run in gosup's cgroup,
so gosup's is theirs.

gosup's own cgroup changes only when someone moves gosup, so its paths are
read once per ``REREAD_AFTER`` seconds, not at every start and exit (a
reload forgets them: ``forget``). Other ``proc`` directories (tests, tools)
are read each time.
"""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self")
REREAD_AFTER = 5.0  # seconds gosup's own cgroup paths (and limits) are trusted

# (when read, what was read) for SELF; ``generation`` counts ``forget`` calls,
# so that a cache built on these paths (goenv's limits) knows to go too.
_own: tuple[float, dict[str, str]] | None = None
generation = 0


def forget() -> None:
    """Read our cgroup again at the next look (a reload: gosup may have been moved)."""
    global _own, generation
    _own = None
    generation += 1


def cgroup_paths(proc: Path = SELF) -> dict[str, str]:
    """controller -> our cgroup's path below its hierarchy's root, without the
    leading "/" ("" names the cgroup v2 unified hierarchy). Empty when unreadable."""
    global _own
    if proc != SELF:
        return _read_paths(proc)
    now = time.monotonic()
    own = _own
    if own is None or now - own[0] > REREAD_AFTER or now < own[0]:
        own = _own = (now, _read_paths(proc))
    return dict(own[1])


def _read_paths(proc: Path) -> dict[str, str]:
    try:
        lines = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return {}
    paths = {}
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path.strip("/")
    return paths


def oom_kills(root: Path = ROOT, proc: Path = SELF) -> int:
    """How often the kernel's OOM killer acted in our cgroup (cgroup v2
    ``memory.events``); 0 when that cannot be read (cgroup v1, no memory
    controller). One read of a kernel file (no disk behind it), the path
    from the cache above."""
    rel = cgroup_paths(proc).get("")
    if rel is None:
        return 0
    try:
        with open(root / rel / "memory.events") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0
