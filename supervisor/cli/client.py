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
READ_SIZE = 1 << 20  # bytes per recv


def connect(args: argparse.Namespace | SimpleNamespace, timeout: float | None = None) -> Connection:
    """A connection to the gosup that ``--socket`` or the config ``-c`` names.

    Only ``[supervisor] state_dir`` is needed, not the whole config: a
    running gosup must stay reachable while its app.toml is being edited
    (that is when ``gosup reload`` is needed most), and supervisor.config's
    import alone would be ~40% of ``gosup status``'s time. When app.toml
    says ``state_dir`` the usual way (`_simple_state_dir`) the socket is
    tried without tomllib (its import compiles regexes: a quarter of what
    status costs beyond Python's start). When nobody answers there, the file
    is parsed whole before giving up: one that is not TOML is a config error
    (exit 2), never "not running", and a guess cannot hide a running gosup.
    """
    if args.socket:
        return Connection(Path(args.socket), timeout)
    guess = _simple_state_dir_of(args.config)
    if guess is not None:
        try:
            return Connection(guess / SOCKET_NAME, timeout)
        except CLIError as exc:
            if exc.code != EXIT_NOT_RUNNING:
                raise
    state_dir = _read_state_dir(args.config)
    if state_dir is None:
        state_dir = load_config(args.config).supervisor.state_dir  # raises CLIError
    return Connection(state_dir / SOCKET_NAME, timeout)


def _resolve(config: str, value: str) -> Path:
    # Exactly as supervisor.config resolves it: relative to the file's directory.
    base = os.path.dirname(os.path.abspath(config))
    return Path(os.path.abspath(os.path.join(base, value)))


def _simple_state_dir_of(config: str) -> Path | None:
    try:
        with open(config, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    value = _simple_state_dir(text)
    return None if value is _UNSURE else _resolve(config, str(value))


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
    return _resolve(config, value)


_UNSURE = object()


def _simple_state_dir(text: str) -> object:
    """``[supervisor] state_dir`` when app.toml says it the usual way, one
    ``state_dir = "..."`` line (no escapes) under a plain ``[supervisor]``
    header, or the default when the file never spells ``state_dir``; else
    ``_UNSURE`` (tomllib decides). Whatever could hide or fake such a line
    (multi-line strings, ``\\u`` escapes that could spell the key, dotted
    or quoted keys, inline tables, a second one) is left to tomllib. A wrong
    guess costs only a connection attempt: `connect` parses the file whole
    when nobody answers at the guessed socket.

    Only the lines that spell ``state_dir`` are read, and the table header
    last before each: app.toml with a thousand programs is ten thousand
    lines, and a loop over them all was a tenth of ``gosup status``.
    Lines are TOML's (split at ``\\n``, a ``\\r`` before it dropped)."""
    if '"""' in text or "'''" in text or "\\u" in text or "\\U" in text:
        return _UNSURE
    import re  # already imported by site in most installs; cheap either way

    state_re = re.compile(r"""\s*state_dir\s*=\s*(?:"([^"\\]*)"|'([^']*)')\s*(?:#.*)?""")
    found = None
    at = text.find("state_dir")
    while at != -1:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end == -1 else end
        m = state_re.fullmatch(text[start:end].removesuffix("\r"))
        if m is None or found is not None or _table_before(text, start) != "supervisor":
            return _UNSURE
        found = m.group(1) if m.group(1) is not None else m.group(2)
        at = text.find("state_dir", end)
    return DEFAULT_STATE_DIR if found is None else found


def _table_before(text: str, end: int) -> str:
    """The table of the line at ``end``: the name in the last header line before
    it ("" before any, "?" for one that is not a plain ``[name]``)."""
    import re

    # A header is a line whose first non-blank is "[" ([^\S\n]: blank, not newline).
    last = None
    for last in re.finditer(r"^[^\S\n]*\[.*", text[:end], re.MULTILINE):  # noqa: B007
        pass
    if last is None:
        return ""
    header = re.fullmatch(r"\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(?:#.*)?", last[0].removesuffix("\r"))
    return header.group(1) if header else "?"  # [[x]], [a.b], ["a"]: not ours


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
        # A status of 1,000 programs is about 250 KB: large reads, and each
        # chunk searched for the newline once (not the whole buffer again).
        chunks, size = [self._buf], len(self._buf)
        while b"\n" not in chunks[-1]:
            if size > MAX_REPLY:
                raise CLIError("gosup's reply is too large")
            chunk = self.sock.recv(READ_SIZE)
            if not chunk:
                self._buf = b"".join(chunks)
                return None
            chunks.append(chunk)
            size += len(chunk)
        line, _, self._buf = b"".join(chunks).partition(b"\n")
        return line


def call(args: argparse.Namespace | SimpleNamespace, cmd: str, **fields: Any) -> Any:
    """One request; the reply's data, or CLIError with the server's error."""
    with connect(args, STATUS_TIMEOUT) as conn:
        reply = conn.request(cmd, **fields)
    if not reply["ok"]:
        raise CLIError(str(reply.get("error", "failed")))
    return reply.get("data")
