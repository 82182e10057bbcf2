"""The leak response: what happens once a limit was over for ``sustain``
samples in a row (the sampler's `Hysteresis` fired).

History first (``limit_exceeded``), then evidence (``evidence_saved``), then
a restart the program's own task carries out (``Restart(reason="leak")``):
not a crash, no backoff, and the counts start afresh for the new process.
The response never signals the child itself: with ``evidence = "sigquit"``
it asks the program to use SIGQUIT as the stop signal of that restart.
"""

from __future__ import annotations

from loguru import logger

from supervisor.config import Evidence
from supervisor.core.program import CommandError, Program, Restart
from supervisor.health.evidence import Dumps
from supervisor.health.sampling import Breach
from supervisor.history import History, now_rfc3339


class LeakResponse:
    """limit_exceeded -> evidence -> restart (reason leak), for any program."""

    def __init__(self, history: History, dumps: Dumps) -> None:
        self.history = history
        self.dumps = dumps

    async def act(self, program: Program, pid: int, breach: Breach) -> None:
        """Respond to ``breach`` found in the run of ``pid``."""
        limits = program.spec.limits
        assert limits is not None  # only a program with limits has a hysteresis
        self.history.record(
            "limit_exceeded", program.name, metric=breach.metric, value=breach.value,
            limit=breach.limit, samples=breach.samples, values=list(breach.values), pid=pid,
        )  # fmt: skip
        program.observations.limit_exceeded = {
            "metric": breach.metric, "value": breach.value, "limit": breach.limit,
            "samples": breach.samples, "ts": now_rfc3339(),
        }  # fmt: skip
        logger.warning(
            "{}: {} {} over its limit {} for {} samples: restarting (pid {})",
            program.name, breach.metric, breach.value, breach.limit, breach.samples, pid,
        )  # fmt: skip
        if limits.evidence is Evidence.PPROF:
            await self.dumps.pprof(program, limits)
        if program.pid != pid:
            logger.info("{}: pid {} is gone already: no leak restart", program.name, pid)
            return
        try:
            if limits.evidence is Evidence.SIGQUIT:
                await self.dumps.restart_with_sigquit(program, pid, "leak")
            else:
                await program.request(Restart(reason="leak", pid=pid))
        except CommandError as exc:
            logger.warning("{}: leak restart: {}", program.name, exc)
