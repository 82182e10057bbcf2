"""The optional subsystems gosup is built from, by module name.

Daemon-side modules register factories in ``supervisor.daemon``
(``SERVICE_FACTORIES`` for supervisor-wide services, ``ATTACHMENT_FACTORIES``
for per-program helpers) when imported. Client-side modules register their
subcommands in ``supervisor.cli.PARSER_EXTENSIONS`` and must stay light
(stdlib only at import time): ``gosup status`` has to start fast.
"""

from __future__ import annotations

import importlib

DAEMON_MODULES: tuple[str, ...] = (
    "supervisor.control",  # control socket server (issue: control)
    "supervisor.configsync",  # staged config files (issue: staged config)
    "supervisor.resources",  # resource watermarks (issue: leaks)
    "supervisor.systemd",  # sd_notify (issue: production)
    "supervisor.metrics",  # Prometheus /metrics (issue: production)
    "supervisor.devmode",  # build and rebuild (issue: development mode)
    "supervisor.orphans",  # pid records, leftover sweep, PID-1 reaping (issue: production)
)

CLIENT_MODULES: tuple[str, ...] = (
    "supervisor.client",  # status, start, stop, restart, signal, reload, dump
    "supervisor.stage",  # gosup stage
)


def load(names: tuple[str, ...]) -> None:
    """Import each module so it registers itself; a module not written yet is skipped."""
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
