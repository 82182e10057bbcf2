"""The control client: finding a running gosup's socket and talking to it.

Stdlib only, and nothing heavier than ``_socket`` and ``json``: ``gosup
status`` must feel instant, so this module never imports asyncio, psutil or
loguru (nor argparse, typing or socket.py's wrappers). The
protocol (one JSON request per line, one reply line each) is described in
docs/control.md; its names and limits are in ``supervisor.protocol``.
"""

from __future__ import annotations

import _socket  # socket.py's wrappers (enums, makefile, selectors) cost a third of the imports
import json
import os
from pathlib import Path

from supervisor.cli.common import EXIT_NOT_RUNNING, CLIError, load_config
from supervisor.protocol import DEFAULT_STATE_DIR, SOCKET_NAME

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import argparse
    from types import SimpleNamespace
    from typing import Any

STATUS_TIMEOUT = 30.0  # seconds; a command that starts or stops waits as long as it takes
MAX_REPLY = 64 << 20  # bytes; a status of thousands of programs stays far below


def socket_path(args: argparse.Namespace | SimpleNamespace) -> Path:
    """``--socket``, or ``<state_dir>/gosup.sock`` (SOCKET_NAME) of the config ``-c`` names.

    Only ``[supervisor] state_dir`` is read, not the whole config: a running
    gosup must stay reachable while its app.toml is being edited (that is
    when ``gosup reload`` is needed most), and supervisor.config's import
    alone would be ~40% of ``gosup status``'s time. The file is still
    parsed whole (tomllib): one that is not TOML is a config error (exit 2)
    rather than a guess at the default socket. Paths resolve exactly as
    supervisor.config resolves them; when the key cannot be read, the full
    loader names the problem (exit 2).
    """
    if args.socket:
        return Path(args.socket)
    state_dir = _read_state_dir(args.config)
    if state_dir is None:
        state_dir = load_config(args.config).supervisor.state_dir  # raises CLIError
    return state_dir / SOCKET_NAME


def _read_state_dir(config: str) -> Path | None:
    try:
        with open(config, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    import tomllib  # here: a command given --socket never pays for its import

    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        return None
    section = data.get("supervisor", {})
    value = section.get("state_dir", DEFAULT_STATE_DIR) if isinstance(section, dict) else None
    if not isinstance(value, str):
        return None
    base = os.path.dirname(os.path.abspath(config))
    return Path(os.path.abspath(os.path.join(base, value)))


class Connection:
    """One connection to a running gosup: ``request()`` any number of times."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buf = b""
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise CLIError(f"no gosup is running at {path}", EXIT_NOT_RUNNING) from None
        except OSError as exc:
            self.sock.close()
            raise CLIError(f"cannot connect to {path}: {exc.strerror or exc}") from None

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
            raise CLIError(f"gosup at {self.path} did not answer in time") from None
        except OSError as exc:
            raise CLIError(f"lost the connection to gosup: {exc.strerror or exc}") from None
        if reply is None:
            raise CLIError("gosup closed the connection without answering")
        try:
            obj = json.loads(reply)
        except ValueError:
            raise CLIError(f"gosup sent an unreadable reply: {reply[:200]!r}") from None
        if not isinstance(obj, dict) or "ok" not in obj:
            raise CLIError(f"gosup sent an unexpected reply: {reply[:200]!r}")
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
                raise CLIError("gosup's reply is too large")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line


def call(args: argparse.Namespace | SimpleNamespace, cmd: str, **fields: Any) -> Any:
    """One request; the reply's data, or CLIError with the server's error."""
    with Connection(socket_path(args), STATUS_TIMEOUT) as conn:
        reply = conn.request(cmd, **fields)
    if not reply["ok"]:
        raise CLIError(str(reply.get("error", "failed")))
    return reply.get("data")
