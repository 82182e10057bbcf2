"""``gosup status``: the table of programs, and the short path that makes the
command feel instant.

With simple arguments ``gosup status`` is parsed here by hand, before any
argparse parser is built; like ``client``, this module imports only the
stdlib and the light modules of this package (docs/control.md, "status"),
and of the stdlib only what printing the table needs: not argparse, typing
or tomllib.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from supervisor.cli.client import call
from supervisor.cli.common import DEFAULT_CONFIG, EXIT_OK, escape

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import argparse
    from typing import Any

# Resource figures shown as extra columns when any program has them.
FIGURE_COLUMNS = (
    ("rss_bytes", "RSS"),
    ("heap_inuse_bytes", "HEAP"),
    ("goroutines", "GOROUTINES"),
    ("threads", "THREADS"),
    ("open_fds", "FDS"),
    ("connections", "CONNS"),
)


def cmd_status(args: argparse.Namespace | SimpleNamespace) -> int:
    data = call(args, "status", names=args.names)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(format_status(data["programs"]))
    return EXIT_OK


_FAST_OPTIONS = {"-c": "config", "--config": "config", "--socket": "socket"}


def fast_status(argv: list[str]) -> int | None:
    """``gosup status ARGS`` parsed by hand, for speed (see commands._fast_path);
    None for anything but names, --json, -c/--config and --socket (help, a
    typo ...), which argparse then handles as usual."""
    ns = parse_fast(argv)
    return None if ns is None else cmd_status(ns)


def parse_fast(argv: list[str]) -> SimpleNamespace | None:
    """The arguments of ``gosup status ARGS`` as argparse would have them, or
    None when argparse must see them (see `fast_status`)."""
    # argparse's Namespace would cost argparse's import: the same attributes.
    ns = SimpleNamespace(names=[], json=False, config=DEFAULT_CONFIG, socket=None)
    args = iter(argv)
    for arg in args:
        key, eq, value = arg.partition("=")
        if arg == "--json":
            ns.json = True
        elif arg in _FAST_OPTIONS:
            value = next(args, "-")
            if value.startswith("-"):
                return None
            setattr(ns, _FAST_OPTIONS[arg], value)
        elif eq and key in ("--config", "--socket"):
            setattr(ns, _FAST_OPTIONS[key], value)
        elif arg.startswith("-"):
            return None
        else:
            ns.names.append(arg)
    return ns


def format_status(programs: list[dict[str, Any]]) -> str:
    """The status table: one row per program, resource columns when known, and
    a NOTE column only when some program has a limit or scrape to point out."""
    # Column by column: a thousand programs are a thousand rows, and gosup
    # status must stay quick (docs/benchmarks.md, "Scale").
    get = dict.get
    figures = [(k, t) for k, t in FIGURE_COLUMNS if any(get(p, k) is not None for p in programs)]
    notes = [format_note(p) for p in programs]
    columns = [
        ("NAME", [escape(p["name"]) for p in programs]),
        ("STATE", [escape(p["state"]) for p in programs]),
        ("PID", [_or_dash(get(p, "pid")) for p in programs]),
        ("UPTIME", [format_duration(get(p, "uptime_s")) for p in programs]),
        ("RESTARTS", [_or_dash(get(p, "restarts")) for p in programs]),
        *((t, [escape(_figure(k, get(p, k))) for p in programs]) for k, t in figures),
        ("LAST EXIT", [escape(format_exit(get(p, "last_exit"))) for p in programs]),
    ]
    if any(notes):
        columns.append(("NOTE", [escape(n or "-") for n in notes]))
    # ljust pads to a width; the last column is never padded (no trailing blanks).
    padded = [
        [c.ljust(w) for c in (title, *cells)]
        for title, cells in columns[:-1]
        for w in [max([len(title), *map(len, cells)])]
    ]
    last_title, last = columns[-1]
    return "\n".join(
        "  ".join(row).rstrip() for row in zip(*padded, (last_title, *last), strict=True)
    )


def _or_dash(value: object) -> str:
    return "-" if value is None else escape(value)


def _figure(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key.endswith("bytes") and isinstance(value, int | float):
        return format_size(value)
    return str(value)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def format_duration(seconds: object) -> str:
    """Uptime for humans: 4.2s, 3m07s, 2h05m, 3d04h."""
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_exit(info: object) -> str:
    if not isinstance(info, dict):
        return "-"
    if info.get("error"):
        text = f"error: {info['error']}"
    elif info.get("signal"):
        text = str(info["signal"])
    else:
        text = f"exit {info.get('exit_code')}"
    if info.get("reason"):
        text = f"{info['reason']} ({text})"
    crash, tail = info.get("crash"), info.get("output_tail")
    if isinstance(crash, dict):
        text += f" ({crash.get('kind')}: {crash.get('message')})"
    elif isinstance(tail, str) and tail.strip():  # the failed run's last words say why
        text += f": {tail.strip().splitlines()[-1]}"
    return _clip(text)


def format_note(p: dict[str, Any]) -> str:
    """What the resource sampler points out, compactly: limits over now (samples
    in a row, of ``sustain``), a failed metrics scrape, the last limit that fired."""
    parts = []
    over = p.get("over_limit")
    if isinstance(over, dict) and over:
        of = f"/{p['sustain']}" if isinstance(p.get("sustain"), int) else ""
        parts.append("over " + ", ".join(f"{m} {n}{of}" for m, n in over.items()))
    error = p.get("scrape_error")
    if isinstance(error, str) and error:
        # "http://127.0.0.1:6060/metrics: HTTP 404": the URL is in app.toml already
        url, sep, rest = error.partition(": ")
        parts.append("scrape: " + (rest if sep and "://" in url else error))
    fired = p.get("limit_exceeded")
    if isinstance(fired, dict):
        parts.append(f"leak: {fired.get('metric')}")
    return _clip("; ".join(parts))


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
