"""Prometheus ``/metrics`` (docs/production.md), served from the event loop itself.

Nothing is counted on the hot paths: a custom collector reads every
program's state, restart counters and sampled figures
(``program.observations.figures``, filled by the resource sampler) at
scrape time. Only config changes are counted as they happen, from the
history records, since no program keeps them.

The HTTP side is a few lines of asyncio rather than prometheus_client's
``start_http_server``: that one answers from a thread, and the collector
reads state that the loop changes. Here the scrape runs on the loop, between
two messages, so it sees a consistent picture without locks. One request per
connection, GET and HEAD only, bounded headers and a read timeout: this is
an endpoint for a scraper, not a web server. At most ``MAX_CONNECTIONS`` are
open; when they are, the one that has waited longest for its request makes
room (``service/conncap.py``), so idle connections cannot lock Prometheus
out nor use up gosup's file descriptors.

With ``[supervisor] status_page = true`` the same port serves the read-only
HTML status page at ``/`` (``service/statuspage.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from supervisor.core.states import RUNNING_STATES, STATE_NUMBERS, ProcessState
from supervisor.service.conncap import Connections
from supervisor.service.looplag import LoopLag
from supervisor.service.statuspage import HEADERS as PAGE_HEADERS
from supervisor.service.statuspage import StatusPage

if TYPE_CHECKING:
    from supervisor.service.daemon import Supervisor

# Reasons are always exported (as 0 until they happen): increase() cannot see
# the first restart of a series that appears with the value 1.
RESTART_REASONS = ("crash", "leak", "unhealthy", "not_ready", "config", "build", "operator")
PROBES = ("ready", "live")  # gosup_probe_failures_total{probe}: probe_failed records
CONFIG_RESULTS = {
    "config_applied": "applied",
    "config_rejected": "rejected",
    "config_confirmed": "confirmed",
}
# config_rolled_back counts as result="rolled_back_<reason>" (docs/config-files.md)
ROLLBACK_REASONS = (
    "reload_failed",
    "unconfirmed",
    "not_ready",
    "unhealthy",
    "exited",
    "crash_loop",
)
STATE_HELP = "Program state: " + " ".join(f"{n}={s.value}" for s, n in STATE_NUMBERS.items())
# Figures that the resource sampler keeps in program.observations.figures,
# exported as gosup_program_<key> (absent until sampled).
FIGURES = {
    "rss_bytes": "Resident memory of the program's process tree.",
    "open_fds": "Open file descriptors of the program's process tree.",
    "threads": "OS threads of the program's process tree.",
    "connections": "Open sockets of the program's process tree.",
    "goroutines": "Goroutines, from the program's Go runtime metrics.",
    "heap_inuse_bytes": "Go heap in use, from the program's Go runtime metrics.",
}
MAX_REQUEST = 8192
READ_TIMEOUT = 5.0  # for the request head; a scraper sends it at once
SEND_TIMEOUT = 10.0  # for the answer to be taken
MAX_CONNECTIONS = 32
HTML = "text/html; charset=utf-8"


class ProgramCollector(Collector):
    """Reads the supervisor's programs at scrape time."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        # (program, result) -> count; kept for programs a reload removed too.
        self.config_changes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.probe_failures: collections.Counter[tuple[str, str]] = collections.Counter()

    def on_record(self, rec: dict[str, object]) -> None:
        """History listener: count config_applied / rejected / rolled_back, probe_failed."""
        result = CONFIG_RESULTS.get(str(rec.get("event")))
        if rec.get("event") == "config_rolled_back":
            result = f"rolled_back_{rec.get('reason')}"
        if result is not None:
            self.config_changes[(str(rec.get("program", "")), result)] += 1
        if rec.get("event") == "probe_failed":
            self.probe_failures[(str(rec.get("program", "")), str(rec.get("probe")))] += 1

    def collect(self) -> Iterator[Metric]:
        programs = list(self.sup.programs.values())
        up = GaugeMetricFamily("gosup_program_up", "1 while RUNNING.", labels=["program"])
        ready = GaugeMetricFamily(
            "gosup_program_ready",
            "1 while RUNNING: started and, with a [ready] probe, passing it.",
            labels=["program"],
        )
        state = GaugeMetricFamily("gosup_program_state", STATE_HELP, labels=["program"])
        restarts = CounterMetricFamily(
            "gosup_program_restarts_total",
            f"Restarts by reason ({', '.join(RESTART_REASONS)}).",
            labels=["program", "reason"],
        )
        for p in programs:
            current: ProcessState = p.state
            up.add_metric([p.name], 1.0 if current in RUNNING_STATES else 0.0)
            ready.add_metric([p.name], 1.0 if current in RUNNING_STATES else 0.0)
            state.add_metric([p.name], float(STATE_NUMBERS[current]))
            counts = p.restarts
            for reason in sorted(set(RESTART_REASONS) | set(counts)):
                restarts.add_metric([p.name, reason], float(counts.get(reason, 0)))
        yield up
        yield ready
        yield state
        yield restarts
        yield from self._figures(programs)
        yield self._config_changes(programs)
        yield self._probe_failures(programs)
        yield CounterMetricFamily(
            "gosup_history_write_errors_total",
            "Records the history file could not take (disk full, I/O error).",
            value=float(self.sup.history.write_errors),
        )

    def _probe_failures(self, programs: list[Any]) -> Metric:
        present = [
            (p.name, probe) for p in programs for probe in PROBES if getattr(p.spec, probe, None)
        ]
        return _counter(
            "gosup_probe_failures_total",
            "Probe verdicts against a program (probe_failed): not ready in time, not live.",
            ["program", "probe"],
            self.probe_failures,
            present,
        )

    def _figures(self, programs: list[Any]) -> Iterator[Metric]:
        for key, text in FIGURES.items():
            family = GaugeMetricFamily(f"gosup_program_{key}", text, labels=["program"])
            for p in programs:
                value = _figure(p.observations.figures, key)
                if value is not None:
                    family.add_metric([p.name], value)
            yield family

    def _config_changes(self, programs: list[Any]) -> Metric:
        present = [
            (p.name, result)
            for p in programs
            if p.spec.config_files
            for result in _config_results()
        ]
        return _counter(
            "gosup_config_changes_total",
            "Config file versions applied, rejected, confirmed, rolled back (by reason).",
            ["program", "result"],
            self.config_changes,
            present,
        )


def _config_results() -> list[str]:
    return [*CONFIG_RESULTS.values(), *(f"rolled_back_{r}" for r in ROLLBACK_REASONS)]


def _figure(figures: dict[str, Any], key: str) -> float | None:
    value = figures.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def build_registry(sup: Supervisor) -> tuple[CollectorRegistry, ProgramCollector]:
    """A registry of our own: the programs, plus gosup's own process_* figures."""
    registry = CollectorRegistry(auto_describe=False)
    collector = ProgramCollector(sup)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry, collector


def split_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9109) from "127.0.0.1:9109" or "[::1]:9109"."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """The ``metrics_listen`` endpoint (a daemon service)."""

    def __init__(self, sup: Supervisor, listen: str) -> None:
        self.sup = sup
        self.listen = listen
        self.registry, self.collector = build_registry(sup)
        self.lag = LoopLag(self.registry)
        self.page = StatusPage(sup) if sup.config.supervisor.status_page else None
        self.connections = Connections(f"metrics_listen {listen}", MAX_CONNECTIONS, READ_TIMEOUT)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        host, port = split_listen(self.listen)
        self.sup.history.add_listener(self.collector.on_record)
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        except OSError as exc:
            self.sup.history.remove_listener(self.collector.on_record)
            raise OSError(exc.errno, f"metrics_listen {self.listen}: {exc.strerror}") from exc
        self.lag.start()
        logger.info("metrics on http://{}/metrics", self.listen)
        if self.page is not None:
            await self.page.start()
            logger.info("status page on http://{}/", self.listen)

    async def close(self) -> None:
        self.lag.close()
        if self.page is not None:
            await self.page.close()
        with contextlib.suppress(ValueError):
            self.sup.history.remove_listener(self.collector.on_record)
        if self._server is not None:
            self._server.close()
            self.connections.close_all()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.connections.admit(writer.transport.abort):
            # Every connection is busy being answered: refuse without waiting on this one.
            busy = b"too many connections\n"
            writer.write(_response("503 Service Unavailable", "text/plain", busy, len(busy)))
            writer.close()
            return
        try:
            async with self.connections.waiting():
                head = await reader.readuntil(b"\r\n\r\n")
            self.connections.busy()
            status, ctype, body, method = self._answer(head)
            extra = PAGE_HEADERS if ctype == HTML else {}
            shown = b"" if method == "HEAD" else body
            writer.write(_response(status, ctype, shown, len(body), extra))
            async with asyncio.timeout(SEND_TIMEOUT):
                await writer.drain()
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away, idled or sent too much: nothing to answer
        finally:
            self.connections.leave()
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # it does not read: do not wait for it
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, str, bytes, str]:
        request, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request.partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics\n", method
        if path == "/" and self.page is not None:
            try:
                return "200 OK", HTML, self.page.render(), method
            except Exception as exc:  # a bug must not take /metrics down with it
                logger.opt(exception=exc).error("status page: rendering failed")
                return "500 Internal Server Error", "text/plain", b"status page failed\n", method
        if path != "/metrics":
            see = b"see /metrics and /\n" if self.page is not None else b"see /metrics\n"
            return "404 Not Found", "text/plain", see, method
        headers = dict(_header(line) for line in header_lines if ":" in line)
        # Prometheus asks for OpenMetrics; curl gets the classic text format.
        try:
            # prometheus_client raises TypeError on a version it cannot parse
            # ("text/plain; version=abc"): such a client gets the classic format.
            encode, ctype = choose_encoder(headers.get("accept", ""))
        except (TypeError, ValueError):
            encode, ctype = choose_encoder("")
        try:
            body = encode(self.registry)
        except Exception as exc:  # a collector bug must not take the endpoint down
            logger.opt(exception=exc).error("metrics: scrape failed")
            return "500 Internal Server Error", "text/plain", b"scrape failed\n", method
        return "200 OK", ctype, body, method


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()


def _response(
    status: str, ctype: str, body: bytes, length: int, extra: dict[str, str] | None = None
) -> bytes:
    more = "".join(f"{name}: {value}\r\n" for name, value in (extra or {}).items())
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{more}"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def make_service(sup: Supervisor) -> MetricsServer | None:
    """The daemon service factory: only when ``metrics_listen`` is set."""
    listen = sup.config.supervisor.metrics_listen
    return MetricsServer(sup, listen) if listen else None


def _counter(
    name: str,
    text: str,
    labels: list[str],
    counts: Mapping[tuple[str, str], int],
    present: list[tuple[str, str]],
) -> Metric:
    """A counter family from ``counts``; the label sets in ``present`` are shown
    from the start at 0 (a rate() over a series that appears late misses its
    first increase)."""
    family = CounterMetricFamily(name, text, labels=labels)
    totals = collections.Counter(counts)
    for key in present:
        totals[key] += 0
    for key, n in sorted(totals.items()):
        family.add_metric(list(key), float(n))
    return family
