"""Units of app.toml values: durations, sizes and signal names (stdlib only).

Small converters in the style of supervisord's ``datatypes.py``: each takes
one raw value and returns a typed one or raises ``ValueError`` with a short
message, which ``config`` turns into an error naming file and key path.
"""

from __future__ import annotations

import math
import re
import signal

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h))+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h)")
_SIZE_RE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_duration(value: str | int | float) -> float:
    """Seconds from "250ms", "10s", "5m", "1h", "1.5s", "1m30s" or a plain number."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"duration {value!r} must not be negative")
        if re.fullmatch(_NUMBER, text):
            seconds = float(text)
        elif _DURATION_RE.fullmatch(text):
            parts = _DURATION_PART_RE.findall(text)
            seconds = sum(float(n) * _DURATION_UNITS[unit] for n, unit in parts)
        else:
            raise ValueError(f"invalid duration {value!r} (e.g. '250ms', '10s', '5m', '1h')")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}")
    if seconds < 0:
        raise ValueError(f"duration {value!r} must not be negative")
    return seconds


def parse_size(value: str | int) -> int:
    """Bytes from "512MiB", "2GiB", "100MB", "10KB", "64B" or a plain integer.

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (as in
    GOMEMLIMIT); units are not case-sensitive.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None or match[2].lower() not in _SIZE_UNITS:
            if value.strip().startswith("-"):
                raise ValueError(f"size {value!r} must not be negative")
            raise ValueError(f"invalid size {value!r} (e.g. '512MiB', '2GiB', '100MB', 4096)")
        size = round(float(match[1]) * _SIZE_UNITS[match[2].lower()])
    if size < 0:
        raise ValueError(f"size {value!r} must not be negative")
    return size


def parse_signal(value: str | int) -> signal.Signals:
    """A signal from "SIGTERM", "TERM", "term", "15" or 15."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"unknown signal {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int):
        try:
            return signal.Signals(value)
        except ValueError:
            raise ValueError(f"unknown signal {value}") from None
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"unknown signal {value!r}") from None
