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

The answer comes from a program, so it is untrusted input, and it is read
with bounded work: at most ``METRICS_MAX_BYTES``; Prometheus text of at most
``MAX_LINES`` lines of ``MAX_LINE`` bytes, scanned in linear time; expvar
JSON nested no deeper than Python's JSON reader allows (a RecursionError is
a scrape error like any other). An answer over ``THREAD_ABOVE`` bytes is
parsed in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import re

from supervisor.health.gohttp import HttpClient, http_get, target_of
from supervisor.health.gohttp import ScrapeError as ScrapeError

METRICS_MAX_BYTES = 4 * 1024**2
MAX_LINES = 200_000  # Prometheus text: a big Go service exports a few thousand
MAX_LINE = 64 * 1024
THREAD_ABOVE = 256 * 1024

# A sample's name is found by bytes.find (a line start checked by hand),
# then what follows it matched from there: a label set never crosses a
# newline, so each byte is looked at a bounded number of times, whatever the
# answer holds (and no pattern is tried at every byte of it).
_PROM_VALUE = re.compile(rb"(?:\{[^}\n]*\})?[ \t]+([^\s]+)")
_PROM_KEYS = {b"go_goroutines": "goroutines", b"go_memstats_heap_inuse_bytes": "heap_inuse_bytes"}
_PPROF_TOTAL = re.compile(rb"^goroutine profile: total (\d+)")
# Go's expvar handler writes one top-level variable a line (``"name": value``,
# the value compact JSON, so a line start is always a top-level member), and
# memstats starts with flat numbers, HeapInuse among them, before PauseNs
# and BySize (most of its bytes). Reading those two by pattern costs a few
# microseconds where json.loads of the whole answer costs about 0.15 ms; an
# answer laid out otherwise is read by json.loads. Each pattern is anchored
# and its repetition unambiguous: linear in the answer's size.
_EXPVAR_START = b'{\n"'
_EXPVAR_HEAP = re.compile(
    rb'^"memstats": \{(?:"[A-Za-z]+":[0-9.eE+-]+,){0,40}"HeapInuse":([0-9]{1,20})[,}]', re.MULTILINE
)
_EXPVAR_GOROUTINES = re.compile(rb'^"goroutines": ([0-9]{1,20}),?$', re.MULTILINE)


def parse_metrics(body: bytes) -> dict[str, int]:
    """``goroutines`` and/or ``heap_inuse_bytes`` from any of the three formats."""
    text = body.lstrip()
    if text.startswith(b"{"):
        return _parse_expvar(text)
    match = _PPROF_TOTAL.match(text)
    if match is not None:
        return {"goroutines": int(match[1])}
    return _parse_prometheus(text)


def check_text(body: bytes) -> None:
    """ScrapeError unless ``body`` is within the Prometheus text caps."""
    if len(body) <= MAX_LINE and len(body) < MAX_LINES:
        return  # within both, whatever its lines (most answers: no split needed)
    lines = body.count(b"\n") + 1
    if lines > MAX_LINES:
        raise ScrapeError(f"answer has {lines} lines, more than {MAX_LINES}")
    longest = max(map(len, body.split(b"\n")))
    if longest > MAX_LINE:
        raise ScrapeError(f"answer has a line of {longest} bytes, more than {MAX_LINE}")


def _parse_expvar(text: bytes) -> dict[str, int]:
    if text.startswith(_EXPVAR_START) and (quick := _expvar_by_pattern(text)) is not None:
        return quick
    try:
        data = json.loads(text)
    except RecursionError:
        raise ScrapeError("answer is JSON nested too deep to read") from None
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


def _expvar_by_pattern(text: bytes) -> dict[str, int] | None:
    """Both figures by pattern, or None: then json.loads reads the answer.

    Never half of them: a figure the patterns miss may be there in another
    layout, and a limit on it would go unenforced.
    """
    heap = _EXPVAR_HEAP.search(text)
    if heap is None:
        return None
    found = {"heap_inuse_bytes": int(heap[1])}
    if (goroutines := _EXPVAR_GOROUTINES.search(text)) is not None:
        found["goroutines"] = int(goroutines[1])
    elif b'"goroutines"' in text:
        return None  # published, laid out otherwise
    return found


def _parse_prometheus(text: bytes) -> dict[str, int]:
    check_text(text)
    found: dict[str, int] = {}
    for name, key in _PROM_KEYS.items():
        for value in _prom_values(text, name):
            try:
                number = float(value)
            except ValueError:
                continue  # not a number: as if the line were not there
            if math.isfinite(number) and number >= 0:
                found[key] = int(number)  # the last one counts
    if not found:
        raise ScrapeError("no go_goroutines or go_memstats_heap_inuse_bytes in the answer")
    return found


def _prom_values(text: bytes, name: bytes) -> list[bytes]:
    """The values of every sample of ``name`` (at a line start) in ``text``."""
    values, start = [], 0
    while (at := text.find(name, start)) >= 0:
        start = at + len(name)
        if at == 0 or text[at - 1] == 0x0A:
            match = _PROM_VALUE.match(text, start)
            if match is not None:
                values.append(match[1])
    return values


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
        if len(response.body) > THREAD_ABOVE:
            return await asyncio.to_thread(parse_metrics, response.body)
        return parse_metrics(response.body)
    except ScrapeError as exc:
        raise ScrapeError(f"{url}: {exc}") from None
