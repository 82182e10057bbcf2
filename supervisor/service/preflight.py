"""What ``gosup check`` can know about a config beyond its syntax.

The file parses, yet a program may still be doomed: its ``command[0]`` is
not there or not executable (a typo, a binary not deployed yet). gosup
would take it, the program would go FATAL, and ``gosup check`` in
``ExecStartPre`` would have let systemd start it all the same. Found here,
it is an error; a warning instead when the program has a ``[build]`` section
(dev mode builds the binary before the first start).

The binary is looked up with the helper that starts programs
(`supervisor.core.spawn.resolve_executable`), against the program's
directory and PATH, so the verdict is the one the start would give.

``metrics_listen`` on an address other than loopback is a warning: the port
has no authentication, and whoever reaches it reads /metrics (and the status
page, when it is on). That may well be intended (a Prometheus on another
host), so it is said, not refused (docs/security.md). So is a ready probe on
an overlap program's own socket without ``{pid}`` (core/overlap.py).
"""

from __future__ import annotations

import ipaddress
import socket

from supervisor.config import AppConfig
from supervisor.core import overlap, spawn
from supervisor.service.metrics import split_listen


def findings(config: AppConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the programs' binaries, each naming file and key."""
    errors: list[str] = []
    warnings: list[str] = metrics_warnings(config) + overlap.shared_port_warnings(config)
    base = spawn.base_environment()
    for spec in config.programs:
        env = {**base, **spec.environment}
        try:
            spawn.resolve_executable(spec.command[0], spec.directory, env)
        except spawn.SpawnError as exc:
            where = f"{config.path}: programs.{spec.name}.command"
            if spec.build is not None:
                warnings.append(f"{where}: {exc} (its [build] is expected to produce it)")
            else:
                errors.append(f"{where}: {exc}")
    return errors, warnings


def metrics_warnings(config: AppConfig) -> list[str]:
    """A warning when ``metrics_listen`` answers beyond this host."""
    listen = config.supervisor.metrics_listen
    if listen is None or _loopback_only(split_listen(listen)[0]):
        return []
    page = " and the status page" if config.supervisor.status_page else ""
    return [
        f"{config.path}: supervisor.metrics_listen: {listen} is not a loopback address: "
        f"/metrics{page} answer anyone who can reach it, without authentication "
        "(fine for a Prometheus on another host behind a firewall; see docs/security.md)"
    ]


def _loopback_only(host: str) -> bool:
    """Every address ``host`` stands for is a loopback one (a name is resolved)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False  # cannot tell: say so
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )
