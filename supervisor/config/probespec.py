"""Readiness and liveness probes as config values (stdlib only).

A probe is one of five kinds, each with a target: ``http`` (a URL; 2xx or
3xx passes), ``tcp`` ("host:port"; a connect passes), ``exec`` (argv; exit 0
passes), ``metric`` (one sample read from the program's ``go_metrics``,
compared with a number) and, for readiness only, ``notify`` (the program
says ``READY=1`` itself over sd_notify; core/notify.py). The metric
expression is parsed here, once, so a typo is a ``gosup check`` error and
not a probe that never passes:

    name{label="value", other="x"} >= 1

``{pid}`` in an http URL or in an exec probe's arguments stands for the pid
of the run being probed (like reload_command's): during an overlap restart
the old and the new process accept on the same socket, and only a probe
that names the pid can tell which of them answered (docs/zero-downtime.md).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass


class ProbeKind(enum.Enum):
    HTTP = "http"
    TCP = "tcp"
    EXEC = "exec"
    METRIC = "metric"
    NOTIFY = "notify"  # [ready] only: READY=1 from the run's own pid (sd_notify)


PID = "{pid}"  # in an http or exec target: the probed run's pid


COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


@dataclass(frozen=True)
class MetricCheck:
    """``name{labels} op value``: passes when the sample compares true."""

    name: str
    labels: tuple[tuple[str, str], ...]
    op: str
    value: float

    def passes(self, sample: float) -> bool:
        return COMPARISONS[self.op](sample, self.value)

    def __str__(self) -> str:
        labels = ",".join(f'{k}="{v}"' for k, v in self.labels)
        return (
            f"{self.name}{{{labels}}} {self.op} {self.value:g}"
            if labels
            else (f"{self.name} {self.op} {self.value:g}")
        )


@dataclass(frozen=True)
class ProbeSpec:
    """``[programs.X.ready]`` or ``[programs.X.live]``: what to probe and how often."""

    kind: ProbeKind
    target: str | tuple[str, ...] | MetricCheck
    interval: float
    timeout: float
    within: float = 30.0  # ready: not ready by then is a failed start
    failures: int = 3  # live: consecutive failures before a restart

    def describe(self) -> str:
        """The target as written, for history records and messages."""
        if self.kind is ProbeKind.NOTIFY:
            return "sd_notify READY=1"
        if isinstance(self.target, tuple):
            return " ".join(self.target)
        return str(self.target)

    @property
    def names_pid(self) -> bool:
        """Whether the target has ``{pid}``: only the probed run itself can pass it."""
        if isinstance(self.target, tuple):
            return any(PID in arg for arg in self.target)
        return isinstance(self.target, str) and PID in self.target

    def for_pid(self, pid: int | None) -> ProbeSpec:
        """This probe with ``{pid}`` replaced by ``pid`` (as is without a pid or ``{pid}``)."""
        if pid is None or not self.names_pid:
            return self
        if isinstance(self.target, tuple):
            argv = tuple(arg.replace(PID, str(pid)) for arg in self.target)
            return dataclasses.replace(self, target=argv)
        assert isinstance(self.target, str)
        return dataclasses.replace(self, target=self.target.replace(PID, str(pid)))


READY_DEFAULTS = {"interval": 0.25, "timeout": 1.0}
LIVE_DEFAULTS = {"interval": 5.0, "timeout": 2.0}

_METRIC = re.compile(
    r"\s*(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?:\{(?P<labels>[^}]*)\})?"
    r"\s*(?P<op>==|!=|<=|>=|<|>)\s*(?P<value>\S+)\s*"
)
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def parse_metric_check(text: str) -> MetricCheck:
    """``name{label="v"} >= 1`` -> MetricCheck; ValueError saying what is wrong."""
    match = _METRIC.fullmatch(text)
    if match is None:
        example = 'name{label="v"} >= 1'
        raise ValueError(f"must look like {example!r} (== != < <= > >=), not {text!r}")
    try:
        value = float(match["value"])
    except ValueError:
        raise ValueError(f"{match['value']!r} is not a number") from None
    if math.isnan(value):
        raise ValueError("NaN compares false with everything")
    return MetricCheck(match["name"], _labels(match["labels"] or ""), match["op"], value)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    labels: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _LABEL.match(text, pos)
        if match is None:
            raise ValueError(f'labels must be name="value" pairs, not {text[pos:]!r}')
        value = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], match[2])
        labels.append((match[1], value))
        pos = match.end()
    return tuple(sorted(labels))
