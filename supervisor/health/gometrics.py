"""A Go program's runtime figures, read from whatever it already serves at
``go_metrics``, told apart by the answer itself, not by the URL:

- a JSON object is expvar (``/debug/vars``: ``memstats.HeapInuse``, and a
  ``goroutines`` variable when the program publishes one);
- a ``goroutine profile: total N`` first line is pprof
  (``/debug/pprof/goroutine?debug=1``);
- anything else is read as Prometheus text (``go_goroutines``,
  ``go_memstats_heap_inuse_bytes``).

A failed scrape is an error to show, never a reason to kill: callers catch
`ScrapeError`.
"""

from __future__ import annotations

import json
import math
import re

from supervisor.health.gohttp import HttpClient, http_get, target_of
from supervisor.health.gohttp import ScrapeError as ScrapeError

METRICS_MAX_BYTES = 4 * 1024**2

_PROM_LINE = re.compile(
    r"^(go_goroutines|go_memstats_heap_inuse_bytes)(?:\{[^}]*\})?\s+(\S+)", re.MULTILINE
)
_PROM_KEYS = {"go_goroutines": "goroutines", "go_memstats_heap_inuse_bytes": "heap_inuse_bytes"}
_PPROF_TOTAL = re.compile(rb"^goroutine profile: total (\d+)")


def parse_metrics(body: bytes) -> dict[str, int]:
    """``goroutines`` and/or ``heap_inuse_bytes`` from any of the three formats."""
    text = body.lstrip()
    if text.startswith(b"{"):
        return _parse_expvar(text)
    match = _PPROF_TOTAL.match(text)
    if match is not None:
        return {"goroutines": int(match[1])}
    return _parse_prometheus(text)


def _parse_expvar(text: bytes) -> dict[str, int]:
    try:
        data = json.loads(text)
    except ValueError:
        raise ScrapeError("answer looks like JSON but does not parse") from None
    found: dict[str, int] = {}
    memstats = data.get("memstats") if isinstance(data, dict) else None
    if isinstance(memstats, dict) and _is_count(memstats.get("HeapInuse")):
        found["heap_inuse_bytes"] = int(memstats["HeapInuse"])
    if isinstance(data, dict) and _is_count(data.get("goroutines")):
        found["goroutines"] = int(data["goroutines"])
    if not found:
        raise ScrapeError("expvar answer has neither memstats.HeapInuse nor goroutines")
    return found


def _parse_prometheus(text: bytes) -> dict[str, int]:
    found: dict[str, int] = {}
    for name, value in _PROM_LINE.findall(text.decode("utf-8", "replace")):
        try:
            number = float(value)
        except ValueError:
            continue  # not a number: as if the line were not there
        if math.isfinite(number) and number >= 0:
            found[_PROM_KEYS[name]] = int(number)
    if not found:
        raise ScrapeError("no go_goroutines or go_memstats_heap_inuse_bytes in the answer")
    return found


def _is_count(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


async def scrape(url: str, timeout: float, client: HttpClient | None = None) -> dict[str, int]:
    """The Go figures at ``url``; ScrapeError when unreachable, slow or not Go metrics.
    With ``client`` (made for ``url``) its kept-alive connection is used."""
    if client is None:
        response = await http_get(url, timeout, METRICS_MAX_BYTES)
    else:
        response = await client.get(target_of(url), timeout, METRICS_MAX_BYTES)
    if response.status != 200:
        raise ScrapeError(f"{url}: HTTP {response.status}")
    try:
        return parse_metrics(response.body)
    except ScrapeError as exc:
        raise ScrapeError(f"{url}: {exc}") from None
