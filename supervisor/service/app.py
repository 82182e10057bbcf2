"""The composition root: every part gosup runs, built by name, in one place.

A reader finds what runs by reading ``build``: nothing registers itself by
being imported, and a part that is missing is an ImportError here, at
start, not a feature that silently is not there.

Order matters and is spelled out:

- services start in this order and close in reverse: the control socket
  first (its lock refuses a second gosup before anything else is touched),
  clearing a previous gosup's leftovers last (it needs the config, and
  nothing may start a program before it has run); the sd_notify socket
  for the programs (``[ready] notify``) right after the control socket;
- a child's extra environment comes from the providers in this order, a
  later one winning: the Go runtime settings, gosup's marks, then the
  program's NOTIFY_SOCKET (gosup's, never systemd's: spawn drops that one).

A part that only some configurations use is imported only when the
configuration uses it, still here and by name: ``/metrics`` (and with it
prometheus_client) only with ``metrics_listen``, ConfigSync (watchdog) only
for a program with ``config_files``, dev mode (watchdog, pathspec) only with
``--dev`` or a ``[build]`` section, the HTTP client's h11 only when a URL is
named (a probe, ``go_metrics``) and ssl only for an ``https`` one (asyncio
itself is imported without it: ``core/tls.py``). An idle gosup without them
does not pay their memory (docs/benchmarks.md, "Overhead").
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from supervisor.config import AppConfig
from supervisor.core.notify import SOCKET_NAME, NotifySocket
from supervisor.core.program import Program
from supervisor.health import gohttp, probing
from supervisor.health.evidence import Dumps
from supervisor.health.goenv import GoEnv
from supervisor.health.resources import ResourceSampler
from supervisor.health.watermarks import LeakResponse
from supervisor.protocol import RequestError
from supervisor.service import control, orphans, systemd
from supervisor.service.daemon import Attachment, Service, Supervisor

SAMPLING_ENV = "GOSUP_SAMPLING"  # "0": no resource sampling (benchmarks compare with it off)


def build(config: AppConfig, *, echo: bool = False, dev: bool = False) -> Supervisor:
    """The Supervisor for ``config`` with every part it needs, wired."""
    sup = Supervisor(config, echo=echo, dev=dev)
    state_dir = config.supervisor.state_dir
    urls = [u for u in _strings(config) if u.startswith(("http://", "https://"))]
    if urls:  # imported now, not on the loop at the first probe (a reload imports its own)
        gohttp.prepare(https=any(u.startswith("https://") for u in urls))

    server = control.ControlServer(sup)
    dumps = Dumps(sup.history, state_dir / "dumps")
    sampler = ResourceSampler(
        lambda: sup.programs,
        LeakResponse(sup.history, dumps),
        enabled=os.environ.get(SAMPLING_ENV, "1") != "0",
    )
    go_env = GoEnv(lambda: sup.programs)
    leftovers = orphans.OrphanService(sup)
    notify = NotifySocket(state_dir / SOCKET_NAME)

    async def handle_dump(sup: Supervisor, req: control.Request) -> Any:
        name = req.get("name", str)
        if name is None:
            raise RequestError("dump: name the program to dump")
        program = sup.programs.get(name)
        if program is None:
            raise RequestError(f"unknown program {name!r}")
        return await dumps.on_request(program)

    server.add_command("dump", handle_dump)
    sup.state_listeners.append(sampler.on_state)

    services: list[Service | None] = [
        server,
        notify,
        sampler,
        systemd.make_service(sup),
        _metrics(sup),
        _dev_watch(sup) if dev else None,
        leftovers,
    ]
    sup.services = [s for s in services if s is not None]
    sup.ctx.env_providers = (go_env, leftovers.marks, notify.environment)
    sup.ctx.marked_escapees = leftovers.escapees
    sup.ctx.adopts = lambda: leftovers.adopts

    def config_sync(sup: Supervisor, program: Program) -> Attachment | None:
        if not program.spec.config_files:
            return None
        from supervisor.files.configsync import ConfigSync  # watchdog: only when used

        marks = leftovers.marks(program.spec)
        return ConfigSync(sup.history, program, marks, state_dir, probing.pid_probers(program))

    def probes(sup: Supervisor, program: Program) -> Attachment | None:
        return probing.build_for(sup.history, program, dumps, notify)

    sup.attachment_factories = [config_sync, probes, _dev_build]
    return sup


def _metrics(sup: Supervisor) -> Service | None:
    """``/metrics`` (prometheus_client), only when ``metrics_listen`` is set."""
    if not sup.config.supervisor.metrics_listen:
        return None
    from supervisor.service import metrics

    return metrics.make_service(sup)


def _dev_watch(sup: Supervisor) -> Service:
    """``--dev``: app.toml applied on save."""
    from supervisor.service import devmode

    return devmode.ConfigWatch(sup)


def _dev_build(sup: Supervisor, program: Program) -> Attachment | None:
    """A program's dev-mode build: only a program with a [build] section."""
    if program.spec.build is None:
        return None
    from supervisor.service import devmode  # watchdog and pathspec: only when used

    return devmode.build_for(sup, program)


def _strings(value: object) -> Iterator[str]:
    """Every string in a config tree (frozen dataclasses, tuples, dicts): the
    URLs among them say what the HTTP client will need."""
    if isinstance(value, str):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _strings(getattr(value, field.name))
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
