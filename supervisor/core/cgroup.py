"""Our cgroup, as ``/proc/self/cgroup`` names it: the one parser for everything
that looks at it (OOM kill counts here in core, memory and CPU limits for the
Go environment in `supervisor.health.goenv`). Children run in gosup's cgroup,
so gosup's is theirs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
SELF = Path("/proc/self")


def cgroup_paths(proc: Path = SELF) -> dict[str, str]:
    """controller -> our cgroup's path below its hierarchy's root, without the
    leading "/" ("" names the cgroup v2 unified hierarchy). Empty when unreadable."""
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
    ``memory.events``); 0 when that cannot be read (cgroup v1, no memory controller)."""
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
