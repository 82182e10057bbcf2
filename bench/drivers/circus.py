"""circus (from PyPI, in bench/.cache/venv): `circusd circus.ini` in the foreground.

Control endpoints are ipc:// sockets in the work directory (no TCP port to
collide with another run) and the multicast discovery endpoint is switched
off: benchmarks use loopback only.
"""

from __future__ import annotations

import shlex

from drivers import Driver, _install

# circus notices a dead process only when its controller polls (check_delay;
# 5 s by default in circus.ini). Restart latency is bounded by it, so the
# restart benchmark gives circus a fast poll (and a faster one beside it);
# other benchmarks keep the default.
FAST_CHECK_DELAY = 0.1
DEFAULT_CHECK_DELAY = 5.0


class CircusDriver(Driver):
    name = "circus"

    def command(self) -> list[str]:
        return [str(_install.venv_bin("circusd")), "--log-output", "circusd.log", "circus.ini"]

    def ctl_command(self) -> list[str]:
        """circusctl talking to this instance."""
        return [str(_install.venv_bin("circusctl")), "--endpoint", self.endpoint()]

    def endpoint(self) -> str:
        return f"ipc://{self.dir}/circus-ctl.sock"

    def write_config(self) -> None:
        parts = [
            "[circus]",
            f"endpoint = {self.endpoint()}",
            f"pubsub_endpoint = ipc://{self.dir}/circus-pub.sock",
            "multicast_endpoint =",
            "statsd = False",
        ]
        delay = self.settings.check_delay
        if delay is None and self.settings.fast_restart:
            delay = FAST_CHECK_DELAY
        if delay is not None:
            parts.append(f"check_delay = {delay:g}")
        for prog in self.programs:
            parts += ["", *self._watcher(prog.name, prog.argv)]
        (self.dir / "circus.ini").write_text("\n".join(parts) + "\n")

    def _watcher(self, name: str, argv: tuple[str, ...]) -> list[str]:
        s = self.settings
        return [
            f"[watcher:{name}]",
            f"cmd = {shlex.quote(argv[0])}",
            f"args = {shlex.join(argv[1:])}",
            "numprocesses = 1",
            f"working_dir = {self.dir}",
            "copy_env = True",
            f"respawn = {not s.oneshot}",
            "max_retry = -1",
            "graceful_timeout = 5",
            "stdout_stream.class = FileStream",
            f"stdout_stream.filename = {self.log_path(name)}",
            "stdout_stream.max_bytes = 0",
            "stderr_stream.class = FileStream",
            f"stderr_stream.filename = {self.err_path(name)}",
            "stderr_stream.max_bytes = 0",
        ]
