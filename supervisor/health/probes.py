"""One probe attempt of each kind: ``None`` when it passes, else what failed.

Nothing here blocks the loop: HTTP goes through `supervisor.health.gohttp`
(the client that reads go_metrics), TCP is an asyncio connect, the metric
answer is parsed in a thread (a big /metrics page takes milliseconds of
CPU), and an ``exec`` probe is a child in its own process group, killed as
a group and reaped when it outlives its timeout, so a hung probe leaves
nothing behind.

``{pid}`` in an http URL or an exec argument is the probed run's pid (the
one ``run`` is given): only that process can pass such a probe, which
is what readiness needs while two processes share a socket (overlap). Such
a URL gets a connection of its own per attempt: a kept-alive one would stay
with whichever process accepted it first, the old one perhaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from supervisor.config import MetricCheck, ProbeKind, ProbeSpec, ProgramSpec
from supervisor.core import spawn
from supervisor.health import gohttp
from supervisor.health.gometrics import METRICS_MAX_BYTES, ScrapeError, check_text

HTTP_MAX_BYTES = 64 * 1024  # a probe reads the status; the body only to keep the connection
EXEC_OUTPUT_BYTES = 512  # the end of a failing exec probe's output, for its error


class Prober:
    """Runs one program's probe of one kind; keeps its HTTP connection alive."""

    def __init__(self, probe: ProbeSpec, program: ProgramSpec) -> None:
        self.probe = probe
        self.program = program
        self._client: gohttp.HttpClient | None = None
        self._url = self._target = ""
        if probe.kind is ProbeKind.HTTP:
            assert isinstance(probe.target, str)
            self._url = probe.target
        elif probe.kind is ProbeKind.METRIC:
            limits = program.limits
            assert limits is not None and limits.go_metrics is not None  # checked by config
            self._url = limits.go_metrics
        if self._url:
            self._client = gohttp.HttpClient(self._url)
            self._target = gohttp.target_of(self._url)

    async def run(self, pid: int | None = None) -> str | None:
        """One attempt within ``timeout``: None when it passed, else the error.

        ``pid``: the run to probe, for ``{pid}``."""
        if self.probe.kind is ProbeKind.NOTIFY:
            # Said once, at the start (health/probing.py waits for it): a run
            # that is RUNNING said it. (Probation's last look asks this.)
            return None
        if self.probe.names_pid and pid is None:
            return f"{self.probe.describe()}: no process to probe for {{pid}}"
        probe = self.probe.for_pid(pid)
        url = probe.target if probe.kind is ProbeKind.HTTP else self._url
        try:
            if probe.kind is ProbeKind.TCP:
                assert isinstance(probe.target, str)
                return await tcp(probe.target, probe.timeout)
            if probe.kind is ProbeKind.EXEC:
                assert isinstance(probe.target, tuple)
                return await run_exec(probe.target, self.program, probe.timeout)
            if self.probe.names_pid:
                assert isinstance(url, str)
                response = await gohttp.http_get(url, probe.timeout, self._max_bytes)
            else:
                assert self._client is not None
                response = await self._client.get(self._target, probe.timeout, self._max_bytes)
        except gohttp.ScrapeError as exc:
            return str(exc)
        if probe.kind is ProbeKind.HTTP:
            ok = 200 <= response.status < 400
            return None if ok else f"{url}: HTTP {response.status}"
        if response.status != 200:
            return f"{self._url}: HTTP {response.status}"
        assert isinstance(probe.target, MetricCheck)
        return await asyncio.to_thread(metric_verdict, probe.target, response.body)

    @property
    def _max_bytes(self) -> int:
        return METRICS_MAX_BYTES if self.probe.kind is ProbeKind.METRIC else HTTP_MAX_BYTES

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


async def tcp(address: str, timeout: float) -> str | None:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, int(port))
    except TimeoutError:
        return f"tcp {address}: no connection within {timeout:g}s"
    except OSError as exc:
        return f"tcp {address}: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def run_exec(argv: tuple[str, ...], program: ProgramSpec, timeout: float) -> str | None:
    """Run ``argv`` in the program's directory and environment, in its own group."""
    env = spawn.base_environment()
    env.update(program.environment)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=program.directory,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return f"exec {argv[0]}: {exc.strerror or exc}"
    assert proc.stdout is not None
    tail = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await proc.stdout.read(65536):
                tail = (tail + chunk)[-EXEC_OUTPUT_BYTES:]
            code = await proc.wait()
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        return f"exec {argv[0]}: no verdict within {timeout:g}s (killed)"
    finally:
        if proc.returncode is None:  # cancelled: still leave nothing behind
            _kill_group(proc.pid)
            await asyncio.shield(proc.wait())
    _kill_group(proc.pid)  # helpers it left running in its group
    if code == 0:
        return None
    last = bytes(tail).decode("utf-8", "replace").strip().splitlines()
    said = f": {last[-1]}" if last else ""
    return f"exec {argv[0]}: exit {code}{said}" if code > 0 else f"exec {argv[0]}: signal {-code}"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def metric_verdict(check: MetricCheck, body: bytes) -> str | None:
    """Compare the sample ``check`` names (labels a subset) in Prometheus text."""
    # prometheus_client (its parser) only for a program that has a metric probe.
    from prometheus_client.parser import text_string_to_metric_families

    wanted = dict(check.labels)
    try:
        check_text(body)
    except ScrapeError as exc:
        return f"metrics are not readable ({exc})"
    try:
        for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
            for sample in family.samples:
                if sample.name != check.name:
                    continue
                if any(sample.labels.get(k) != v for k, v in wanted.items()):
                    continue
                if check.passes(sample.value):
                    return None
                return f"{check}: the sample is {sample.value:g}"
    except ValueError as exc:
        return f"metrics are not Prometheus text ({exc})"
    return f"{check}: no such sample"
