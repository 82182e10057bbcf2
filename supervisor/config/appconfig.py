"""The gosup config file (app.toml, docs/config.md) parsed into frozen dataclasses.

Reading happens once, up front, and either yields a complete `AppConfig` or
raises one `ConfigError` carrying *every* problem found, each naming the file
and the key path (``app.toml: programs.api.backoff.max: must be > 0``). An
operator fixing a config should not have to run ``gosup check`` once per typo.

The shape follows supervisord's ``datatypes.py``: small named converters take
one raw TOML value and return a typed one or raise `ValueError` with a short
message; `_Table` applies them key by key, turns each `ValueError` into a
located message, and reports keys nobody asked for (circus accepts unknown
keys silently, and its users pay for it). After an error a converter's
fallback value stands in so that checking can go on; nothing built from a
config with errors ever leaves this module.

Stdlib only (``supervisor.fileops`` is too): the fast CLI path (``gosup check``,
``gosup status``) imports it.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import re
import signal
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from supervisor import fileops
from supervisor.config import tomlchunks
from supervisor.config.probespec import (
    LIVE_DEFAULTS,
    PID,
    READY_DEFAULTS,
    MetricCheck,
    ProbeKind,
    ProbeSpec,
    parse_metric_check,
)
from supervisor.config.units import parse_duration, parse_signal, parse_size
from supervisor.protocol import DEFAULT_STATE_DIR, PROGRAM_NAME

__all__ = [
    "CAPABILITIES",
    "UNIX_SOCKET_MODE",
    "AppConfig",
    "BackoffSpec",
    "BuildSpec",
    "ConfigError",
    "ConfigFileSpec",
    "Evidence",
    "LimitsSpec",
    "LogSpec",
    "MetricCheck",
    "OnChange",
    "ProbeKind",
    "ProbeSpec",
    "ProgramSpec",
    "RestartMode",
    "RestartPolicy",
    "SocketSpec",
    "SupervisorSpec",
    "check_file",
    "is_loopback_host",
    "load",
    "loads",
    "parse_duration",
    "parse_signal",
    "parse_size",
]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)
Converter = Callable[[object], T]


class ConfigError(Exception):
    """The config cannot be used; `errors` holds one located message per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


# --- the spec dataclasses ---------------------------------------------------


class RestartPolicy(enum.Enum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class RestartMode(enum.Enum):
    STOP_FIRST = "stop-first"  # stop the old process, then start the new one
    OVERLAP = "overlap"  # planned restarts start the new one first (DESIGN §3)


class OnChange(enum.Enum):
    RELOAD = "reload"
    RESTART = "restart"
    NONE = "none"


class Evidence(enum.Enum):
    PPROF = "pprof"
    SIGQUIT = "sigquit"
    NONE = "none"


@dataclass(frozen=True)
class BackoffSpec:
    initial: float = 0.25
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2
    reset_after: float = 60.0
    give_up_after: int = 10  # consecutive failed runs before FATAL; 0 = never


@dataclass(frozen=True)
class LogSpec:
    max_size: int = 50 * 1024**2
    backups: int = 5


@dataclass(frozen=True)
class LimitsSpec:
    interval: float = 5.0
    sustain: int = 3
    rss: int | None = None
    open_fds: int | None = None
    threads: int | None = None
    connections: int | None = None
    goroutines: int | None = None
    heap_inuse: int | None = None
    go_metrics: str | None = None
    allow_remote_metrics: bool = False
    evidence: Evidence = Evidence.PPROF
    dump_max_size: int = 16 * 1024**2
    dump_keep: int = 10


@dataclass(frozen=True)
class ConfigFileSpec:
    path: Path  # absolute, symlinks kept (a ConfigMap's ..data link is the point)
    staging: Path | None  # None: watch the live file itself
    validate: tuple[str, ...] | None = None
    validate_timeout: float = 30.0
    on_change: OnChange = OnChange.RELOAD
    probation: float = 30.0
    # Proves the program took the version (any probe kind; docs/config-files.md).
    confirm: ProbeSpec | None = None


@dataclass(frozen=True)
class SocketSpec:
    """A listening socket gosup binds once and passes to the program (fd 3 + index).

    ``address`` is ``(host, port)`` for tcp/tcp6 and the absolute path for unix;
    ``text`` is the canonical form, which names the socket in errors, status
    and the registry of bound sockets (core/sockets.py).
    """

    family: str  # "tcp" | "tcp6" | "unix"
    address: tuple[str, int] | str
    text: str


UNIX_SOCKET_MODE = 0o660  # a unix socket's mode: the program's users connect, others do not


@dataclass(frozen=True)
class BuildSpec:
    command: tuple[str, ...]
    directory: Path
    watch: tuple[str, ...] = ("**/*.go", "go.mod", "go.sum")
    ignore: tuple[str, ...] = ()
    debounce: float = 0.2


def _empty_environment() -> Mapping[str, str]:
    return types.MappingProxyType({})


@dataclass(frozen=True)
class ProgramSpec:
    name: str
    command: tuple[str, ...]  # command[0] as written; spawn resolves it against directory
    directory: Path
    # hash=False: a mappingproxy is unhashable, yet specs stay hashable and comparable.
    environment: Mapping[str, str] = field(default_factory=_empty_environment, hash=False)
    user: str | None = None
    group: str | None = None
    autostart: bool = True
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    success_exit_codes: frozenset[int] = frozenset({0})
    start_seconds: float = 1.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    reload_signal: signal.Signals = signal.SIGHUP
    # Run instead of sending reload_signal ("{pid}" is the child's pid); exit != 0 = failed.
    reload_command: tuple[str, ...] | None = None
    go_env: bool = True
    backoff: BackoffSpec = field(default_factory=BackoffSpec)
    logs: LogSpec = field(default_factory=LogSpec)
    limits: LimitsSpec | None = None
    config_files: tuple[ConfigFileSpec, ...] = ()
    build: BuildSpec | None = None
    ready: ProbeSpec | None = None  # RUNNING (and READY=1) only once this passes
    live: ProbeSpec | None = None  # probed while RUNNING; failing -> restart (unhealthy)
    sockets: tuple[SocketSpec, ...] = ()  # bound by gosup, inherited as fds 3..
    restart_mode: RestartMode = RestartMode.STOP_FIRST
    # kept as ambient capabilities after the user switch ("CAP_NET_BIND_SERVICE", ...)
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class SupervisorSpec:
    state_dir: Path
    log_dir: Path
    metrics_listen: str | None = None
    shutdown_timeout: float = 30.0
    history_max_size: int = 64 * 1024**2  # history.jsonl rotates here ...
    history_backups: int = 5  # ... keeping this many older files
    status_page: bool = False  # the read-only HTML page at metrics_listen "/"
    nice: int = -10  # gosup's session's autogroup nice (service/cpuweight.py)


@dataclass(frozen=True)
class AppConfig:
    path: Path
    sha256: str
    supervisor: SupervisorSpec
    programs: tuple[ProgramSpec, ...]

    def program(self, name: str) -> ProgramSpec:
        """The program called `name`; KeyError if there is none."""
        for program in self.programs:
            if program.name == name:
                return program
        raise KeyError(name)


def _keys(cls: type, *not_keys: str) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls)) - set(not_keys)


_TOP_KEYS = frozenset({"supervisor", "programs"})
_SUPERVISOR_KEYS = _keys(SupervisorSpec)
_PROGRAM_KEYS = _keys(ProgramSpec, "name")
_BACKOFF_KEYS = _keys(BackoffSpec)
_LOG_KEYS = _keys(LogSpec)
_LIMITS_KEYS = _keys(LimitsSpec)
_CONFIG_FILE_KEYS = _keys(ConfigFileSpec)
_BUILD_KEYS = _keys(BuildSpec)
# notify (READY=1 over sd_notify) says when a run got ready, not whether it is still live.
_PROBE_TARGETS = frozenset(kind.value for kind in ProbeKind if kind is not ProbeKind.NOTIFY)
_READY_KEYS = _PROBE_TARGETS | {"notify", "interval", "timeout", "within"}
_LIVE_KEYS = _PROBE_TARGETS | {"interval", "timeout", "failures"}
_CONFIRM_KEYS = _LIVE_KEYS
# confirm: probed through probation; `failures` in a row end it early (unconfirmed).
CONFIRM_DEFAULTS = {"interval": 1.0, "timeout": 2.0, "failures": 2}
_PROBE_DEFAULTS = {"ready": READY_DEFAULTS, "live": LIVE_DEFAULTS, "confirm": CONFIRM_DEFAULTS}


# --- converters: one raw TOML value in, a typed value out, or ValueError ----


def _toml_type(value: object) -> str:
    kinds = [(bool, "boolean"), (int, "integer"), (float, "float"), (str, "string")]
    kinds += [(list, "array"), (dict, "table")]
    return next((name for kind, name in kinds if isinstance(value, kind)), "date/time")


def _wrong_type(expected: str, value: object) -> ValueError:
    return ValueError(f"must be {expected}, not {_toml_type(value)}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type("a string", value)
    if not value or "\0" in value:
        raise ValueError("must be a non-empty string without NUL")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type("true or false", value)
    return value


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type("an integer", value)
    return value


def _nice(value: object) -> int:
    n = _integer(value)
    if not -20 <= n <= 19:
        raise ValueError(f"must be a nice value from -20 to 19, got {n}")
    return n


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type("a number", value)
    return float(value)


def _duration(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _wrong_type("a duration like '10s' or a number of seconds", value)
    return parse_duration(value)


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _wrong_type("a size like '512MiB' or an integer of bytes", value)
    return parse_size(value)


def _signal(value: object) -> signal.Signals:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _wrong_type("a signal name like 'SIGTERM'", value)
    return parse_signal(value)


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _wrong_type("an array of strings", value)
    return tuple(value)


def _argv(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be an array of strings (argv; no shell)")
    if not value or not value[0]:
        raise ValueError("must not be empty: the first item is the program to run")
    if any("\0" in item for item in value):
        raise ValueError("must not contain NUL characters")
    return tuple(value)


def _validator(value: object) -> tuple[str, ...]:
    argv = _argv(value)
    if not any("{file}" in arg for arg in argv):
        # Without it the validator checks something else than the staged file
        # (a "{path}" typo): every deploy would then be judged on a wrong file.
        raise ValueError("must name the staged file as {file} in one of its arguments")
    return argv


def _exit_codes(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(type(c) is int and 0 <= c <= 255 for c in value):
        raise ValueError("must be an array of exit codes (integers 0-255)")
    return frozenset(value)


def _choice(kind: type[E]) -> Converter[E]:
    allowed = ", ".join(repr(member.value) for member in kind)

    def convert(value: object) -> E:
        try:
            return kind(_string(value))
        except ValueError:
            raise ValueError(f"must be one of {allowed}, not {value!r}") from None

    return convert


def _path(base: str) -> Converter[Path]:
    # abspath, not resolve(): a symlinked live file must stay the symlink.
    return lambda value: Path(os.path.abspath(os.path.join(base, _string(value))))


def _staging(base: str) -> Converter[Path | None]:
    def convert(value: object) -> Path | None:
        if value is False:
            return None
        if isinstance(value, bool):
            raise ValueError("must be a path, or false to watch the live file itself")
        return _path(base)(value)

    return convert


def _listen_address(value: object) -> str:
    text = _string(value)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        sep = sep if ":" not in host else ""
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"must be 'host:port' or '[ipv6]:port' with port 1-65535, not {text!r}")
    return text


def _metrics_url(value: object) -> str:
    text = _string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, not {text!r}")
    return text


def _is_loopback(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checked(convert: Converter[T], test: Callable[[T], bool], message: str) -> Converter[T]:
    """`convert`, then insist on `test` (e.g. "must be > 0")."""

    def run(value: object) -> T:
        result = convert(value)
        if not test(result):
            raise ValueError(message)
        return result

    return run


_positive_duration = _checked(_duration, lambda v: v > 0, "must be > 0")
_positive_size = _checked(_size, lambda v: v > 0, "must be > 0")
_positive_integer = _checked(_integer, lambda v: v > 0, "must be > 0")
_non_negative_integer = _checked(_integer, lambda v: v >= 0, "must be >= 0")
_at_least_one = _checked(_number, lambda v: v >= 1, "must be >= 1")
_fraction = _checked(_number, lambda v: 0 <= v < 1, "must be >= 0 and < 1")


# --- reading tables ---------------------------------------------------------


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _quote(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


class _Table:
    """One TOML table being read: converts keys, locates errors, rejects unknown keys."""

    def __init__(
        self, errors: list[str], source: str, data: Mapping[str, object], path: str,
        known: frozenset[str] | None,
    ) -> None:  # fmt: skip
        """`known` lists the allowed keys; None allows any (environment, programs)."""
        self._errors, self._source, self._data, self.path = errors, source, data, path
        for key in data:
            if known is not None and key not in known:
                import difflib  # only for a mistake's suggestion

                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.error(key, f"unknown key{hint}")

    @property
    def errors(self) -> list[str]:
        """Every error found so far in the file (this table's and the others')."""
        return self._errors

    def key_path(self, key: str) -> str:
        return f"{self.path}.{_quote(key)}" if self.path else _quote(key)

    def error(self, key: str, message: str) -> None:
        self._errors.append(f"{self._source}: {self.key_path(key)}: {message}")

    def item_error(self, key: str, index: int, message: str) -> None:
        """An error about item ``index`` of the array ``key`` (``sockets[1]``)."""
        self._errors.append(f"{self._source}: {self.key_path(key)}[{index}]: {message}")

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def get(self, key: str, convert: Converter[T], default: T) -> T:
        """The converted value of `key`; `default` when absent or invalid."""
        if key not in self._data:
            return default
        try:
            return convert(self._data[key])
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def require(self, key: str, convert: Converter[T], fallback: T) -> T:
        if key not in self._data:
            self.error(key, "is required")
        return self.get(key, convert, fallback)

    def table(self, key: str, known: frozenset[str] | None) -> _Table | None:
        value = self._data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.error(key, f"must be a table, not {_toml_type(value)}")
            return None
        return self._child(value, self.key_path(key), known)

    def tables(self, key: str, known: frozenset[str]) -> list[_Table]:
        """An array of tables (``[[key]]``)."""
        value = self._data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.error(key, f"must be an array of tables ([[{self.key_path(key)}]])")
            return []
        return [self._child(v, f"{self.key_path(key)}[{i}]", known) for i, v in enumerate(value)]

    def items(self) -> Iterable[tuple[str, object]]:
        return self._data.items()

    def _child(self, data: Mapping[str, object], path: str, known: frozenset[str] | None) -> _Table:
        return _Table(self._errors, self._source, data, path, known)


# --- building the specs -----------------------------------------------------


def _supervisor(t: _Table | None, base: str) -> SupervisorSpec:
    if t is None:
        t = _Table([], "", {}, "supervisor", None)  # all defaults
    spec = SupervisorSpec(
        state_dir=t.get("state_dir", _path(base), _path(base)(DEFAULT_STATE_DIR)),
        log_dir=t.get("log_dir", _path(base), _path(base)("logs")),
        metrics_listen=t.get("metrics_listen", _listen_address, None),
        shutdown_timeout=t.get("shutdown_timeout", _positive_duration, 30.0),
        history_max_size=t.get("history_max_size", _positive_size, SupervisorSpec.history_max_size),
        history_backups=t.get(
            "history_backups", _non_negative_integer, SupervisorSpec.history_backups
        ),
        status_page=t.get("status_page", _boolean, False),
        nice=t.get("nice", _nice, SupervisorSpec.nice),
    )
    if spec.status_page and spec.metrics_listen is None:
        t.error("status_page", "needs metrics_listen (the page is served there, at /)")
    return spec


def _environment(t: _Table, key: str) -> Mapping[str, str]:
    env = t.table(key, None)
    if env is None:
        return _empty_environment()
    result = {}
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            env.error(name, "is not a valid environment variable name")
        elif isinstance(value, str) and "\0" not in value:
            result[name] = value
        else:
            env.error(name, f"must be a string, not {_toml_type(value)}")
    return types.MappingProxyType(result)


def _backoff(t: _Table | None) -> BackoffSpec:
    if t is None:
        return BackoffSpec()
    d = BackoffSpec()
    spec = BackoffSpec(
        initial=t.get("initial", _positive_duration, d.initial),
        max=t.get("max", _positive_duration, d.max),
        multiplier=t.get("multiplier", _at_least_one, d.multiplier),
        jitter=t.get("jitter", _fraction, d.jitter),
        reset_after=t.get("reset_after", _positive_duration, d.reset_after),
        give_up_after=t.get("give_up_after", _non_negative_integer, d.give_up_after),
    )
    if spec.max < spec.initial and "max" in t:
        t.error("max", f"must be >= initial ({spec.initial:g}s)")
    return spec


def _logs(t: _Table | None) -> LogSpec:
    if t is None:
        return LogSpec()
    return LogSpec(
        max_size=t.get("max_size", _positive_size, LogSpec.max_size),
        backups=t.get("backups", _non_negative_integer, LogSpec.backups),
    )


def _limits(t: _Table | None) -> LimitsSpec | None:
    if t is None:
        return None
    d = LimitsSpec()
    spec = LimitsSpec(
        interval=t.get("interval", _positive_duration, d.interval),
        sustain=t.get("sustain", _positive_integer, d.sustain),
        rss=t.get("rss", _positive_size, None),
        open_fds=t.get("open_fds", _positive_integer, None),
        threads=t.get("threads", _positive_integer, None),
        connections=t.get("connections", _positive_integer, None),
        goroutines=t.get("goroutines", _positive_integer, None),
        heap_inuse=t.get("heap_inuse", _positive_size, None),
        go_metrics=t.get("go_metrics", _metrics_url, None),
        allow_remote_metrics=t.get("allow_remote_metrics", _boolean, False),
        evidence=t.get("evidence", _choice(Evidence), d.evidence),
        dump_max_size=t.get("dump_max_size", _positive_size, d.dump_max_size),
        dump_keep=t.get("dump_keep", _positive_integer, d.dump_keep),
    )
    if spec.go_metrics and not spec.allow_remote_metrics and not _is_loopback(spec.go_metrics):
        host = urlsplit(spec.go_metrics).hostname
        t.error("go_metrics", f"{host} is not loopback; set allow_remote_metrics = true if meant")
    return spec


def _reload_command(value: object) -> tuple[str, ...]:
    return _argv(value)


def _config_file(t: _Table, base: str) -> tuple[ConfigFileSpec, bool]:
    """The spec, and whether its path is real (not a stand-in after an error)."""
    path: Path | None = t.require("path", _path(base), None)
    real = path is not None
    path = path or Path(base)
    default_staging: Path | None = Path(f"{path}.new")
    staging = t.get("staging", _staging(base), default_staging)
    spec = ConfigFileSpec(
        path=path,
        staging=staging,
        validate=t.get("validate", _validator, None),
        validate_timeout=t.get("validate_timeout", _positive_duration, 30.0),
        on_change=t.get("on_change", _choice(OnChange), OnChange.RELOAD),
        probation=t.get("probation", _duration, 30.0),
        confirm=_probe(t, "confirm", _CONFIRM_KEYS),
    )
    return spec, real


def _config_files(
    t: _Table, base: str, seen: dict[Path, str], limits: LimitsSpec | None
) -> tuple[ConfigFileSpec, ...]:
    specs = []
    for item in t.tables("config_files", _CONFIG_FILE_KEYS):
        spec, real = _config_file(item, base)
        confirm, go_metrics = spec.confirm, limits.go_metrics if limits else None
        if confirm is not None and confirm.kind is ProbeKind.METRIC and go_metrics is None:
            item.error("confirm", "a metric probe reads go_metrics: set [limits] go_metrics")
        if real and spec.path in seen:
            item.error("path", f"{spec.path} is already watched by {seen[spec.path]}")
        elif real:
            seen[spec.path] = item.key_path("path")
        if spec.staging == spec.path:
            item.error("staging", "must differ from path (use false to watch the live file)")
        specs.append(spec)
    return tuple(specs)


def _build(t: _Table | None, base: str, directory: Path) -> BuildSpec | None:
    if t is None:
        return None
    return BuildSpec(
        command=t.require("command", _argv, ()),
        directory=t.get("directory", _path(base), directory),
        watch=t.get("watch", _strings, BuildSpec.watch),
        ignore=t.get("ignore", _strings, ()),
        debounce=t.get("debounce", _duration, 0.2),
    )


def _tcp_address(value: object) -> str:
    return _listen_address(value)


def _socket(base: str) -> Converter[SocketSpec]:
    def convert(value: object) -> SocketSpec:
        text = _string(value)
        scheme, sep, rest = text.partition("://")
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path or path.startswith("@"):
                raise ValueError(f"must be 'unix:PATH' (a file path), not {text!r}")
            full = os.path.abspath(os.path.join(base, path))
            return SocketSpec("unix", full, f"unix:{full}")
        if not sep or scheme not in ("tcp", "tcp6"):
            raise ValueError(
                f"must be 'tcp://HOST:PORT', 'tcp6://[HOST]:PORT' or 'unix:PATH', not {text!r}"
            )
        _listen_address(rest)
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"needs an IP address, not the name {host!r}, in {text!r}") from None
        if (scheme == "tcp6") != (ip.version == 6):
            want = "an IPv6 address in brackets" if scheme == "tcp6" else "an IPv4 address"
            raise ValueError(f"{scheme}:// needs {want}, not {text!r}")
        shown = f"[{ip}]" if ip.version == 6 else str(ip)
        return SocketSpec(scheme, (str(ip), int(port)), f"{scheme}://{shown}:{port}")

    return convert


def _sockets(t: _Table, base: str, seen: dict[str, str]) -> tuple[SocketSpec, ...]:
    if "sockets" not in t:
        return ()
    raw: list[object] = t.get("sockets", _list, [])
    specs = []
    for i, item in enumerate(raw):
        try:
            spec = _socket(base)(item)
        except ValueError as exc:
            t.item_error("sockets", i, str(exc))
            continue
        if spec.text in seen:
            t.item_error("sockets", i, f"{spec.text} is already listed at {seen[spec.text]}")
            continue
        seen[spec.text] = f"{t.key_path('sockets')}[{i}]"
        specs.append(spec)
    return tuple(specs)


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise _wrong_type("an array of strings", value)
    return value


def _metric_check(value: object) -> MetricCheck:
    return parse_metric_check(_string(value))


def _notify(value: object) -> str:
    if not _boolean(value):
        raise ValueError("false is no probe: leave the key out, or name another target")
    return "READY=1"


def _no_pid(convert: Converter[str]) -> Converter[str]:
    """A target where ``{pid}`` means nothing (tcp, metric): refuse it, not probe it literally."""

    def run(value: object) -> str:
        if isinstance(value, str) and PID in value:
            raise ValueError(f"{PID} is for http and exec probes, not this kind")
        return convert(value)

    return run


_PROBE_CONVERTERS: dict[ProbeKind, Converter[str | tuple[str, ...] | MetricCheck]] = {
    ProbeKind.HTTP: _metrics_url,
    ProbeKind.TCP: _no_pid(_tcp_address),
    ProbeKind.EXEC: _argv,
    ProbeKind.METRIC: _metric_check,
    ProbeKind.NOTIFY: _notify,
}


def _probe(parent: _Table, key: str, known: frozenset[str]) -> ProbeSpec | None:
    """``[ready]`` / ``[live]``: exactly one target key, then its timings."""
    t = parent.table(key, known)
    if t is None:
        return None
    defaults = _PROBE_DEFAULTS[key]
    kinds = [kind for kind in ProbeKind if kind.value in t and kind.value in known]
    if len(kinds) != 1:
        found = ", ".join(k.value for k in kinds) or "none"
        names = "http, tcp, exec, metric or notify" if "notify" in known else ""
        names = names or "http, tcp, exec or metric"
        parent.error(key, f"needs exactly one target: {names} (found: {found})")
        return None
    kind = kinds[0]
    target = t.get(kind.value, _PROBE_CONVERTERS[kind], None)
    spec = ProbeSpec(
        kind=kind,
        target=target if target is not None else "",
        interval=t.get("interval", _positive_duration, defaults["interval"]),
        timeout=t.get("timeout", _positive_duration, defaults["timeout"]),
        within=t.get("within", _positive_duration, ProbeSpec.within),
        failures=t.get("failures", _positive_integer, int(defaults.get("failures", 3))),
    )
    return spec if target is not None else None


def _probes_need_metrics(t: _Table, spec: ProgramSpec) -> None:
    """A metric probe reads the program's go_metrics: without it, it could never pass."""
    go_metrics = spec.limits.go_metrics if spec.limits else None
    for key, probe in (("ready", spec.ready), ("live", spec.live)):
        if probe is not None and probe.kind is ProbeKind.METRIC and go_metrics is None:
            t.error(key, "a metric probe reads go_metrics: set [limits] go_metrics")


# The capabilities by number (linux/capability.h); the kernel may know fewer
# (/proc/sys/kernel/cap_last_cap), and a name it does not know is an error.
_CAPABILITY_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN",
    "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON",
    "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip


def _kernel_capabilities() -> dict[str, int]:
    """name -> number of every capability this kernel knows."""
    last = len(_CAPABILITY_NAMES) - 1
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = min(int(f.read()), last)
    except (OSError, ValueError):
        pass
    return {name: number for number, name in enumerate(_CAPABILITY_NAMES[: last + 1])}


CAPABILITIES: Mapping[str, int] = types.MappingProxyType(_kernel_capabilities())


def _capabilities(value: object) -> tuple[str, ...]:
    names: list[str] = []
    for item in _strings(value):
        name = item.upper()
        name = name if name.startswith("CAP_") else "CAP_" + name
        if name not in CAPABILITIES:
            import difflib  # only for a mistake's suggestion

            close = difflib.get_close_matches(name, CAPABILITIES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"unknown capability {item!r}{hint}: this kernel knows "
                f"{_CAPABILITY_NAMES[0]} .. {max(CAPABILITIES, key=CAPABILITIES.__getitem__)}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def _program(
    name: str, t: _Table, base: str, seen: dict[Path, str], seen_sockets: dict[str, str]
) -> ProgramSpec:
    directory = t.get("directory", _path(base), Path(base))
    spec = ProgramSpec(
        name=name,
        command=t.require("command", _argv, ()),
        directory=directory,
        environment=_environment(t, "environment"),
        user=t.get("user", _string, None),
        group=t.get("group", _string, None),
        autostart=t.get("autostart", _boolean, True),
        restart=t.get("restart", _choice(RestartPolicy), RestartPolicy.ON_FAILURE),
        success_exit_codes=t.get("success_exit_codes", _exit_codes, frozenset({0})),
        start_seconds=t.get("start_seconds", _duration, 1.0),
        stop_signal=t.get("stop_signal", _signal, signal.SIGTERM),
        stop_timeout=t.get("stop_timeout", _positive_duration, 10.0),
        reload_signal=t.get("reload_signal", _signal, signal.SIGHUP),
        reload_command=t.get("reload_command", _reload_command, None),
        go_env=t.get("go_env", _boolean, True),
        backoff=_backoff(t.table("backoff", _BACKOFF_KEYS)),
        logs=_logs(t.table("logs", _LOG_KEYS)),
        limits=(limits := _limits(t.table("limits", _LIMITS_KEYS))),
        config_files=_config_files(t, base, seen, limits),  # a metric confirm needs go_metrics
        build=_build(t.table("build", _BUILD_KEYS), base, directory),
        ready=_probe(t, "ready", _READY_KEYS),
        live=_probe(t, "live", _LIVE_KEYS),
        sockets=_sockets(t, base, seen_sockets),
        restart_mode=t.get("restart_mode", _choice(RestartMode), RestartMode.STOP_FIRST),
        capabilities=t.get("capabilities", _capabilities, ()),
    )
    _probes_need_metrics(t, spec)
    return spec


# The specs built from the last parses of each file: (its absolute path, the
# directory paths are relative to) -> program
# name -> (its table as TOML gave it, the spec). A reload of 1,000 programs
# that changes one converts that one; the others are the same objects as
# before, so comparing them with the running specs is free too. Only specs
# built without an error are kept, and a kept one is used only while it
# claims no config file or socket another program claimed first (else it is
# converted again, to report that exactly as before).
_SPECS: dict[tuple[str, str], dict[str, tuple[object, ProgramSpec]]] = {}
_SPECS_FILES = 4  # the files remembered (gosup reads one; tests, many)


def _programs(table: _Table | None, base: str, path: str) -> tuple[ProgramSpec, ...]:
    if table is None:
        return ()
    seen: dict[Path, str] = {}
    seen_sockets: dict[str, str] = {}
    before = _SPECS.get((path, base), {})
    built: dict[str, tuple[object, ProgramSpec]] = {}
    programs = []
    for name, raw in table.items():
        if not PROGRAM_NAME.fullmatch(name):
            table.error(name, "program names are letters, digits, '_', '.', '-'")
        t = table.table(name, _PROGRAM_KEYS)
        if t is None:
            continue
        known = before.get(name)
        if known is not None and known[0] == raw and _claim(t, known[1], seen, seen_sockets):
            spec = known[1]
        else:
            errors = len(t.errors)
            spec = _program(name, t, base, seen, seen_sockets)
            if len(t.errors) > errors:
                programs.append(spec)
                continue
        built[name] = (raw, spec)
        programs.append(spec)
    _SPECS.pop((path, base), None)
    while len(_SPECS) >= _SPECS_FILES:
        del _SPECS[next(iter(_SPECS))]
    _SPECS[(path, base)] = built
    return tuple(programs)


def _claim(
    t: _Table, spec: ProgramSpec, seen: dict[Path, str], seen_sockets: dict[str, str]
) -> bool:
    """Note the config files and sockets of a kept ``spec`` as ``_program``
    does; False (nothing noted) when another program has one of them."""
    if not spec.config_files and not spec.sockets:  # (most programs)
        return True
    if any(f.path in seen for f in spec.config_files):
        return False
    if any(s.text in seen_sockets for s in spec.sockets):
        return False
    for i, f in enumerate(spec.config_files):
        seen[f.path] = f"{t.key_path('config_files')}[{i}].path"
    for i, s in enumerate(spec.sockets):
        seen_sockets[s.text] = f"{t.key_path('sockets')}[{i}]"
    return True


# --- entry points -----------------------------------------------------------


def _syntax_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where:
        return f"{source}: line {where[1]}, column {where[2]}: {message[: where.start()]}"
    if message.endswith("(at end of document)"):
        return f"{source}: line {text.count(chr(10)) + 1}: {message}"
    return f"{source}: {message}"


MAX_DEPTH = 16  # tables and arrays in tables: app.toml needs 5 at most


def _too_deep(data: object) -> str | None:
    """The key path of the first value nested deeper than MAX_DEPTH, if any."""
    todo: list[tuple[object, str, int]] = [(data, "", 0)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            return path
        if isinstance(value, dict):
            todo += ((v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            todo += ((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
    return None


def _parse(text: str, source: str, sha256: str) -> AppConfig:
    # The file may come from anyone who can write it: nesting that exhausts
    # the parser's recursion, or ours, is a config error, never a traceback.
    too_deep = f"{source}: nested deeper than {MAX_DEPTH} levels"
    path = Path(os.path.abspath(source))
    try:
        # As tomllib.loads(text), the tables unchanged since the last read of
        # this file from a cache (a reload of 1,000 programs changing one).
        data, height = tomlchunks.parse(text, str(path))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_error(source, text, exc)]) from None
    except RecursionError:
        raise ConfigError([f"{too_deep} (too deep to parse)"]) from None
    # (The path is looked for only when the height says there is one.)
    if height > MAX_DEPTH and (where := _too_deep(data)) is not None:
        raise ConfigError([f"{too_deep}: {where[:200]}"])
    base = str(path.parent)
    errors: list[str] = []
    root = _Table(errors, source, data, "", _TOP_KEYS)
    config = AppConfig(
        path=path,
        sha256=sha256,
        supervisor=_supervisor(root.table("supervisor", _SUPERVISOR_KEYS), base),
        programs=_programs(root.table("programs", None), base, str(path)),
    )
    if errors:
        raise ConfigError(errors)
    return config


def loads(text: str, path: str | os.PathLike[str]) -> AppConfig:
    """Parse `text` as if read from `path` (used in messages and for relative paths)."""
    return _parse(text, os.fspath(path), fileops.sha256_bytes(text.encode()))


def load(path: str | os.PathLike[str]) -> AppConfig:
    """Read and validate the config file at `path`; ConfigError lists every problem."""
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not valid UTF-8 (byte {exc.start})"]) from None
    return _parse(text, source, fileops.sha256_bytes(raw))


def check_file(path: str | os.PathLike[str]) -> list[str]:
    """Every error in the config file at `path`; empty when it is valid."""
    try:
        load(path)
    except ConfigError as exc:
        return exc.errors
    return []
