"""Listening sockets that gosup holds for its programs (``sockets = [...]``).

gosup binds and listens once, and keeps the sockets open for as long as a
program lists them: across crashes, restarts and reloads. A child gets them
as fds 3, 4, ... with systemd's socket-activation protocol (``LISTEN_FDS``,
``LISTEN_PID``, ``LISTEN_FDNAMES``; see ``spawn.listen_argv``), so while a
program is between two processes the kernel queues new connections in the
listen backlog instead of refusing them, and a replacement started beside
the old process (``restart_mode = "overlap"``) accepts on the very same
socket.

Every socket here is close-on-exec: only the children that ``spawn`` hands
them to explicitly (a program's own run) ever see one; validators, builds,
probes and other programs do not.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from supervisor.config import UNIX_SOCKET_MODE, AppConfig, ConfigError, ProgramSpec, SocketSpec
from supervisor.core import spawn

BACKLOG = (
    1024  # connections the kernel queues while no process accepts (the kernel caps it at somaxconn)
)


def bind(spec: SocketSpec) -> socket.socket:
    """A listening socket for ``spec``; OSError when it cannot be bound."""
    if spec.family == "unix":
        assert isinstance(spec.address, str)
        return _bind_unix(spec.address)
    assert isinstance(spec.address, tuple)
    family = socket.AF_INET6 if spec.family == "tcp6" else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(spec.address)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _bind_unix(path: str) -> socket.socket:
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    """A socket file that nobody listens on (left by a gosup that died) goes;
    one that answers, or a file that is not a socket, is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale
            return
    raise OSError(f"{path}: another process listens there")


class Listeners:
    """Every socket gosup holds, by its canonical address (``SocketSpec.text``).

    The daemon opens what a config needs before it uses the config (at start
    and at reload: a socket that cannot be bound refuses the whole config,
    nothing changed) and releases what the config no longer lists once the
    programs that used them are stopped.
    """

    def __init__(self) -> None:
        self._held: dict[str, tuple[SocketSpec, socket.socket]] = {}

    def open_for(self, config: AppConfig) -> None:
        """Bind every socket ``config`` lists that is not held yet; ConfigError
        (file and key of each) when one cannot be bound, none of the new ones kept."""
        errors: list[str] = []
        new: list[str] = []
        for program in config.programs:
            for i, spec in enumerate(program.sockets):
                if spec.text in self._held:
                    continue
                try:
                    self._held[spec.text] = (spec, bind(spec))
                    new.append(spec.text)
                except OSError as exc:
                    why = exc.strerror or str(exc)
                    errors.append(
                        f"{config.path}: programs.{program.name}.sockets[{i}]: "
                        f"cannot listen on {spec.text}: {why}"
                    )
        if errors:
            self._close(new)
            raise ConfigError(errors)

    def release_unused(self, config: AppConfig) -> None:
        """Close the sockets ``config`` no longer lists."""
        wanted = {spec.text for program in config.programs for spec in program.sockets}
        self._close([text for text in self._held if text not in wanted])

    def close(self) -> None:
        self._close(list(self._held))

    def for_program(self, spec: ProgramSpec) -> list[socket.socket]:
        """The program's sockets in its order (fd 3 is the first)."""
        return [self._held[s.text][1] for s in spec.sockets if s.text in self._held]

    async def launch(
        self, spec: ProgramSpec, extra_env: Mapping[str, str], *, at_once: bool = False
    ) -> tuple[spawn.Child, str]:
        """``spawn.launch`` with the program's sockets (``Context.launcher``)."""
        listeners = self.for_program(spec)
        return await spawn.launch(spec, extra_env, listeners, spec.name, at_once=at_once)

    def _close(self, texts: Iterable[str]) -> None:
        for text in texts:
            spec, sock = self._held.pop(text)
            if spec.family == "unix":
                assert isinstance(spec.address, str)
                _unlink_if_socket(Path(spec.address))
            sock.close()


def _unlink_if_socket(path: Path) -> None:
    """Remove the socket file, unless something other than a socket was put there
    meanwhile (another socket at the same path is not told apart from ours)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
