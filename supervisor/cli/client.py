"""The control client and the subcommands that use it: status, start, stop,
restart, signal, reload, shutdown, dump.

Stdlib only, and nothing heavier than ``socket`` and ``json``: ``gosup
status`` must feel instant, so this module never imports asyncio, psutil or
loguru. The protocol is described in docs/control.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from supervisor.cli import common as cli
from supervisor.protocol import SOCKET_NAME

STATUS_TIMEOUT = 30.0  # seconds; a command that starts or stops waits as long as it takes
MAX_REPLY = 64 << 20

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = (
    cli.EXIT_OK,
    cli.EXIT_FAILED,
    cli.EXIT_USAGE,
    cli.EXIT_NOT_RUNNING,
)


# -- finding and talking to gosup -------------------------------------------------


def socket_path(args: argparse.Namespace) -> Path:
    """``--socket``, or ``<state_dir>/gosup.sock`` of the config ``-c`` names.

    Only ``[supervisor] state_dir`` is read, not the whole config: a running
    gosup must stay reachable while its app.toml is being edited (that is
    when ``gosup reload`` is needed most), and supervisor.config's import
    alone would be ~40% of ``gosup status``'s time. Paths resolve exactly as
    supervisor.config resolves them; when the key cannot be read, the full
    loader names the problem (exit 2).
    """
    if args.socket:
        return Path(args.socket)
    state_dir = _read_state_dir(args.config)
    if state_dir is None:
        state_dir = cli.load_config(args.config).supervisor.state_dir  # raises CLIError
    return state_dir / SOCKET_NAME


def _read_state_dir(config: str) -> Path | None:
    try:
        with open(config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return None
    section = data.get("supervisor", {})
    value = section.get("state_dir", ".gosup") if isinstance(section, dict) else None
    if not isinstance(value, str):
        return None
    base = os.path.dirname(os.path.abspath(config))
    return Path(os.path.abspath(os.path.join(base, value)))


class Connection:
    """One connection to a running gosup: ``request()`` any number of times."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buf = b""
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise cli.CLIError(f"no gosup is running at {path}", EXIT_NOT_RUNNING) from None
        except OSError as exc:
            self.sock.close()
            raise cli.CLIError(f"cannot connect to {path}: {exc.strerror or exc}") from None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request, return the reply object (``ok`` true or not)."""
        line = json.dumps({"cmd": cmd, **args}, separators=(",", ":")) + "\n"
        try:
            self.sock.sendall(line.encode())
            reply = self._readline()
        except TimeoutError:
            raise cli.CLIError(f"gosup at {self.path} did not answer in time") from None
        except OSError as exc:
            raise cli.CLIError(f"lost the connection to gosup: {exc.strerror or exc}") from None
        if reply is None:
            raise cli.CLIError("gosup closed the connection without answering")
        try:
            obj = json.loads(reply)
        except ValueError:
            raise cli.CLIError(f"gosup sent an unreadable reply: {reply[:200]!r}") from None
        if not isinstance(obj, dict) or "ok" not in obj:
            raise cli.CLIError(f"gosup sent an unexpected reply: {reply[:200]!r}")
        return obj

    def wait_closed(self) -> None:
        """Block until gosup closes the connection (it does so when it exits)."""
        self.sock.settimeout(None)
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def _readline(self) -> bytes | None:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_REPLY:
                raise cli.CLIError("gosup's reply is too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def call(args: argparse.Namespace, cmd: str, **fields: Any) -> Any:
    """One request; the reply's data, or CLIError with the server's error."""
    with Connection(socket_path(args), STATUS_TIMEOUT) as conn:
        reply = conn.request(cmd, **fields)
    if not reply["ok"]:
        raise cli.CLIError(str(reply.get("error", "failed")))
    return reply.get("data")


def _targets(names: list[str]) -> dict[str, Any]:
    """Program names as the protocol takes them: "all" alone means every program."""
    if names == ["all"]:
        return {"all": True}
    if "all" in names:
        raise cli.CLIError("'all' cannot be combined with program names", EXIT_USAGE)
    return {"names": names}


# -- status ---------------------------------------------------------------------------

# Resource figures shown as extra columns when any program has them.
FIGURE_COLUMNS = (
    ("rss_bytes", "RSS"),
    ("heap_inuse_bytes", "HEAP"),
    ("goroutines", "GOROUTINES"),
    ("threads", "THREADS"),
    ("open_fds", "FDS"),
    ("connections", "CONNS"),
)


def cmd_status(args: argparse.Namespace) -> int:
    data = call(args, "status", names=args.names)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(format_status(data["programs"]))
    return EXIT_OK


_FAST_OPTIONS = {"-c": "config", "--config": "config", "--socket": "socket"}


def fast_status(argv: list[str]) -> int | None:
    """``gosup status ARGS`` parsed by hand, for speed (see cli.main._fast_path);
    None for anything but names, --json, -c/--config and --socket (help, a
    typo ...), which argparse then handles as usual."""
    ns = argparse.Namespace(names=[], json=False, config=cli.DEFAULT_CONFIG, socket=None)
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
    return cmd_status(ns)


def format_status(programs: list[dict[str, Any]]) -> str:
    """The status table: one row per program, resource columns when known, and
    a NOTE column only when some program has a limit or scrape to point out."""
    figures = [(k, t) for k, t in FIGURE_COLUMNS if any(p.get(k) is not None for p in programs)]
    notes = [format_note(p) for p in programs]
    header = ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", *(t for _, t in figures), "LAST EXIT"]
    if any(notes):
        header.append("NOTE")
    rows = [header]
    for p, note in zip(programs, notes, strict=True):
        rows.append(
            [
                str(p["name"]),
                str(p["state"]),
                _or_dash(p.get("pid")),
                format_duration(p.get("uptime_s")),
                _or_dash(p.get("restarts")),
                *(_figure(k, p.get(k)) for k, _ in figures),
                format_exit(p.get("last_exit")),
                *([note or "-"] if any(notes) else []),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


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


# -- commands that act --------------------------------------------------------------


def _report(reply: dict[str, Any]) -> int:
    """Print per-program results (failures on stderr); 0 when all succeeded."""
    data = reply.get("data")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        if not reply["ok"]:
            raise cli.CLIError(str(reply.get("error", "failed")))
        return EXIT_OK
    if not results:
        print("nothing to do: no program matched")
    for r in results:
        if r.get("ok"):
            print(r.get("message"))
        else:
            print(f"gosup: {r.get('error')}", file=sys.stderr)
    return EXIT_OK if reply["ok"] else EXIT_FAILED


def _act(args: argparse.Namespace, cmd: str, **fields: Any) -> int:
    # No timeout: a stop lasts up to stop_timeout, a start start_seconds.
    with Connection(socket_path(args)) as conn:
        return _report(conn.request(cmd, **fields))


def cmd_program(args: argparse.Namespace) -> int:
    return _act(args, args.command, **_targets(args.names))


def cmd_signal(args: argparse.Namespace) -> int:
    from supervisor import config as configmod

    try:
        sig = configmod.parse_signal(args.signal)
    except ValueError as exc:
        raise cli.CLIError(str(exc), EXIT_USAGE) from None
    return _act(args, "signal", signal=sig.name, **_targets(args.names))


def cmd_reload(args: argparse.Namespace) -> int:
    with Connection(socket_path(args)) as conn:
        reply = conn.request("reload")
    data = reply.get("data") or {}
    if not reply["ok"]:
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors:  # app.toml is invalid: a config error, exit 2
            print("gosup: reload refused, nothing changed:", file=sys.stderr)
            for error in errors:
                print(error, file=sys.stderr)
            return EXIT_USAGE
        raise cli.CLIError(str(reply.get("error")))
    parts = [f"{k} {', '.join(data[k]) or '-'}" for k in ("added", "removed", "changed")]
    print("reloaded: " + "; ".join(parts))
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    with Connection(socket_path(args)) as conn:
        reply = conn.request("shutdown")
        if not reply["ok"]:
            raise cli.CLIError(str(reply.get("error")))
        if not args.no_wait:
            conn.wait_closed()  # gosup closes the socket once every program has stopped
    print("gosup stopped" if not args.no_wait else "gosup is shutting down")
    return EXIT_OK


def cmd_dump(args: argparse.Namespace) -> int:
    data = call(args, "dump", name=args.name)
    print(data.get("path", data) if isinstance(data, dict) else data)
    return EXIT_OK


# -- the parser ------------------------------------------------------------------------


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--config",
        default=cli.DEFAULT_CONFIG,
        help="the app.toml of the gosup to talk to (default: ./app.toml)",
    )
    p.add_argument("--socket", metavar="PATH", help="talk to the gosup at this control socket")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show the state of every program (or of NAME...)")
    _target_options(p)
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--json", action="store_true", help='print {"programs": [...]} as JSON')
    p.set_defaults(func=cmd_status)

    for cmd, what in (("start", "start"), ("stop", "stop"), ("restart", "restart")):
        p = sub.add_parser(cmd, help=f"{what} programs (NAME... or all) and wait for it")
        _target_options(p)
        p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
        p.set_defaults(func=cmd_program)

    p = sub.add_parser("signal", help="send SIGNAL (HUP, USR1, SIGUSR2, 10 ...) to programs")
    _target_options(p)
    p.add_argument("signal", metavar="SIGNAL")
    p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
    p.set_defaults(func=cmd_signal)

    p = sub.add_parser("reload", help="re-read app.toml and apply the difference")
    _target_options(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("shutdown", help="stop every program and end gosup")
    _target_options(p)
    p.add_argument("--no-wait", action="store_true", help="return without waiting for the end")
    p.set_defaults(func=cmd_shutdown)

    p = sub.add_parser("dump", help="save a goroutine dump of NAME now (under state_dir/dumps/)")
    _target_options(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_dump)
