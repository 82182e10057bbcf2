"""The status page: ``[supervisor] status_page = true`` serves it at ``/`` on
``metrics_listen`` (service/metrics.py routes the request here).

Where people would rather look than read: every program with its state,
pid, uptime, restarts, readiness and the reason of its last exit, and a
timeline of the last 24 hours of restarts drawn from the history. It is
read-only on purpose: the port has no authentication, so there is no
button, no form and no script; the page only shows what ``gosup status``
and ``gosup history`` show (docs/security.md says what that reveals).

Plain HTML and CSS with an inline SVG, no external assets, so it works on
a host with no internet access and in a text browser (the table). It is
rendered on the event loop from memory: the programs' state, and a bounded
list of restart events kept from the history's records as they are
written; only at start, the end of the history file is read, in a thread,
to fill the last 24 hours in. Everything that came from a program (exit
messages, names) is HTML-escaped, and the response forbids scripts
(``Content-Security-Policy``) in case anything ever is not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from supervisor import __version__
from supervisor import history as events

if TYPE_CHECKING:
    from supervisor.service.daemon import Supervisor

DAY = 24 * 3600.0
LOAD_RECORDS = 20_000  # the end of the history read at start
MAX_EVENTS = 20_000  # restart events kept in memory (oldest dropped)
WIDTH = 960  # the timeline's drawing width in px; one mark per px, kind and program at most
ROW = 22
LABEL = 150  # px for the program names left of the timeline
REFRESH_S = 10
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}

# Which records are restarts, and how each is drawn.
KINDS = {
    "backoff": ("failed run", "#d9534f"),  # a crash or failed start, restarted after a delay
    "restart_requested": ("restart", "#f0ad4e"),  # leak, unhealthy, config, operator, build
    "fatal": ("gave up", "#222222"),
}


@dataclass(frozen=True)
class Event:
    at: float  # Unix time
    program: str
    kind: str  # a KINDS key
    why: str


class StatusPage:
    """Renders the page; keeps the restart events of the last 24 hours."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.events: collections.deque[Event] = collections.deque(maxlen=MAX_EVENTS)
        self._last_exit: dict[str, str] = {}  # program -> why its last run ended
        self._load: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.sup.history.add_listener(self.on_record)
        self._load = asyncio.get_running_loop().create_task(self._read_past(), name="statuspage")

    async def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.sup.history.remove_listener(self.on_record)
        if self._load is not None:
            self._load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._load

    # -- the events ------------------------------------------------------------------

    def on_record(self, rec: dict[str, Any]) -> None:
        """History listener: note exits (for the label) and restarts."""
        event = _event(rec, self._last_exit)
        if event is not None:
            self.events.append(event)

    async def _read_past(self) -> None:
        """The restarts of the last 24 hours from before this gosup started."""
        try:
            records = await asyncio.to_thread(_last_records, self.sup.history.path)
        except OSError as exc:
            logger.warning("status page: cannot read the history: {}", exc)
            return
        since = time.time() - DAY
        last_exit: dict[str, str] = {}
        past = [e for e in (_event(r, last_exit) for r in records) if e is not None]
        live = set(self.events)
        older = [e for e in past if e.at >= since and e not in live]
        self.events.extendleft(reversed(older[-(MAX_EVENTS - len(self.events)) :]))

    # -- the page -------------------------------------------------------------------------

    def render(self, now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        programs = [p.status() | {"_spec": p.spec} for p in self.sup.programs.values()]
        config = self.sup.config
        stamp = _utc(now).strftime("%Y-%m-%d %H:%M:%S UTC")
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="refresh" content="{REFRESH_S}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>gosup: {_e(str(config.path))}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>gosup <small>{_e(__version__)}</small></h1>",
            f'<p class="meta">{_e(str(config.path))} &middot; {len(programs)} programs &middot; '
            f"{stamp} &middot; read-only, refreshed every {REFRESH_S} s</p>",
            _table(programs),
            "<h2>Restarts, last 24 hours</h2>",
            self._timeline(programs, now),
            "</body></html>",
        ]
        return "\n".join(parts).encode()

    def _timeline(self, programs: list[dict[str, Any]], now: float) -> str:
        names = [str(p["name"]) for p in programs]
        rows = {name: i for i, name in enumerate(names)}
        height = ROW * max(len(names), 1) + 30
        full = LABEL + WIDTH + 10
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{full}" height="{height}" '
            f'viewBox="0 0 {full} {height}" role="img" aria-label="restarts in the last 24 hours">'
        ]
        out += _grid(now, len(names), height)
        for name, i in rows.items():
            y = ROW * i
            out.append(f'<text x="0" y="{y + 15}" class="name">{_e(_cut(name, 20))}</text>')
            out.append(f'<line x1="{LABEL}" x2="{LABEL + WIDTH}" y1="{y + 11}" y2="{y + 11}" />')
        out += _marks(self.events, rows, now)
        out.append("</svg>")
        legend = " ".join(
            f'<span class="key" style="background:{colour}"></span>{_e(text)}'
            for text, colour in KINDS.values()
        )
        return "\n".join(out) + f'\n<p class="legend">{legend}</p>'


# -- pieces -------------------------------------------------------------------------------


def _last_records(path: Path) -> list[dict[str, Any]]:
    """The end of the history, across rotated files (bounded: LOAD_RECORDS, SCAN_LIMIT)."""
    with events.Last(path, LOAD_RECORDS) as last:
        return list(last)


def _event(rec: dict[str, Any], last_exit: dict[str, str]) -> Event | None:
    kind = rec.get("event")
    program = rec.get("program")
    if not isinstance(program, str):
        return None
    if kind == "exited":
        last_exit[program] = exit_reason(rec)
        return None
    if kind not in KINDS:
        return None
    at = _epoch(rec.get("ts"))
    if at is None:
        return None
    if kind == "backoff":
        why = last_exit.get(program, "exited")
        why += f"; attempt {rec.get('attempt')}, again in {rec.get('delay_s')} s"
    elif kind == "restart_requested":
        why = f"requested: {rec.get('reason')}"
    else:
        why = f"gave up after {rec.get('attempts')} failed runs"
    return Event(at, program, str(kind), why)


def exit_reason(last: dict[str, Any] | None) -> str:
    """How a run ended, in a line: ``exit code 1: bind: address already in use``."""
    if not last:
        return ""
    if last.get("error"):
        return _cut(str(last["error"]), 200)
    signal = last.get("signal")
    how = f"signal {signal}" if signal else f"exit code {last.get('exit_code')}"
    if last.get("reason"):
        how = f"{last['reason']} ({how})"
    crash = last.get("crash")
    tail = last.get("output_tail")
    if isinstance(crash, dict):
        how += f": {crash.get('kind')}: {crash.get('message')}"
    elif isinstance(tail, str) and tail.strip():
        how += f": {tail.strip().splitlines()[-1]}"
    return _cut(how, 200)


def _table(programs: list[dict[str, Any]]) -> str:
    readiness = [_readiness(p) for p in programs]
    show_ready = any(r is not None for r in readiness)
    head = ["Program", "State", "PID", "Uptime", "Restarts"]
    head += ["Ready"] if show_ready else []
    head += ["Last exit"]
    rows = ["<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"]
    for p, ready in zip(programs, readiness, strict=True):
        state = str(p.get("state", "?"))
        cells = [
            f"<td>{_e(str(p['name']))}</td>",
            f'<td><span class="state {_e(state.lower())}">{_e(state)}</span></td>',
            f"<td>{p['pid'] if p.get('pid') is not None else '&ndash;'}</td>",
            f"<td>{_duration(p.get('uptime_s'))}</td>",
            f"<td>{int(p.get('restarts') or 0)}</td>",
        ]
        if show_ready:
            cells.append(f"<td>{_e(ready or '')}</td>")
        cells.append(f'<td class="exit">{_e(exit_reason(p.get("last_exit")))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _readiness(p: dict[str, Any]) -> str | None:
    """ "ready"/"not ready" when the program reports readiness or has a [ready] probe."""
    if isinstance(p.get("ready"), bool):
        return "ready" if p["ready"] else "not ready"
    if getattr(p.get("_spec"), "ready", None) is None:
        return None
    return "ready" if p.get("state") == "RUNNING" else "not ready"


def _grid(now: float, rows: int, height: int) -> list[str]:
    """Hour lines every 3 hours, labelled in UTC, under the rows."""
    out = []
    first = (int(now - DAY) // 10800 + 1) * 10800
    for at in range(first, int(now) + 1, 10800):
        x = _x(at, now)
        label = _utc(at).strftime("%H:00")
        out.append(f'<line class="hour" x1="{x}" x2="{x}" y1="0" y2="{height - 18}" />')
        out.append(f'<text x="{x}" y="{height - 4}" class="hour">{label}</text>')
    return out


def _marks(evs: Iterable[Event], rows: dict[str, int], now: float) -> list[str]:
    """One mark per pixel column, kind and program: a crash loop of 10,000
    restarts a day draws at most WIDTH marks, each saying how many it stands for."""
    cells: dict[tuple[str, str, int], list[Event]] = {}
    since = now - DAY
    for ev in evs:
        if ev.at >= since and ev.program in rows:
            cells.setdefault((ev.program, ev.kind, int(_x(ev.at, now))), []).append(ev)
    out = []
    for (program, kind, x), group in cells.items():
        y = ROW * rows[program] + (4 if kind != "fatal" else 2)
        h = 14 if kind != "fatal" else 18
        last = group[-1]
        when = _utc(last.at).strftime("%H:%M:%S UTC")
        more = f" (and {len(group) - 1} more here)" if len(group) > 1 else ""
        title = f"{program} {when}: {KINDS[kind][0]}: {last.why}{more}"
        out.append(
            f'<rect x="{x}" y="{y}" width="2" height="{h}" fill="{KINDS[kind][1]}">'
            f"<title>{_e(title)}</title></rect>"
        )
    return out


def _x(at: float, now: float) -> float:
    return round(LABEL + min(max((at - (now - DAY)) / DAY, 0.0), 1.0) * WIDTH, 1)


def _epoch(ts: object) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return datetime.datetime.fromisoformat(ts).timestamp()
    except ValueError:
        return None


def _utc(at: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(at, datetime.UTC)


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "&ndash;"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _e(text: str) -> str:
    """HTML-escaped, and control characters shown, not passed on."""
    import html  # here: its entity table is 0.5 MiB that a gosup without the page never needs

    shown = "".join(c if c.isprintable() or c == " " else f"\\x{ord(c):02x}" for c in text)
    return html.escape(shown, quote=True)


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 small { font-weight: normal; color: #777; font-size: 60%; }
h2 { font-size: 110%; margin-top: 1.5em; }
.meta { color: #666; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; }
td.exit { font-family: ui-monospace, monospace; font-size: 12px; max-width: 50em;
  overflow-wrap: anywhere; }
.state { padding: 1px 6px; border-radius: 3px; background: #eee; font-weight: 600; }
.state.running { background: #d4edda; color: #155724; }
.state.starting, .state.stopping { background: #fff3cd; color: #856404; }
.state.backoff, .state.exited { background: #f8d7da; color: #721c24; }
.state.fatal { background: #222; color: #fff; }
svg { font: 12px system-ui, sans-serif; }
svg line { stroke: #ddd; }
svg line.hour { stroke: #eee; }
svg text.hour { fill: #888; }
.legend .key { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }
"""
