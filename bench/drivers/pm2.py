"""pm2 (from npm, in bench/.cache/npm): `pm2 start ecosystem.json` with a
private PM2_HOME in the work directory; the God daemon it spawns is the
supervisor we measure, and `pm2 kill` stops it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import common

from drivers import Driver, _install, pid_alive, wait_gone

CLI_TIMEOUT = 300.0  # `pm2 start` of 200 apps on a busy machine


class Pm2Driver(Driver):
    name = "pm2"
    reset_window = 1.0  # min_uptime's default (1000 ms): a shorter run is an unstable restart

    @property
    def home(self) -> Path:
        return self.dir / ".pm2"

    def env(self) -> dict[str, str]:
        return common.bench_env(self.tag, scrub_python=True, PM2_HOME=str(self.home))

    def cli(self, *args: str) -> list[str]:
        node = shutil.which("node") or "node"
        return [node, str(_install.pm2_bin()), *args]

    def command(self) -> list[str]:
        return self.cli("start", "ecosystem.json")

    def ctl_command(self) -> list[str]:
        """The pm2 CLI for this instance (run it with `env()`: PM2_HOME selects it)."""
        return self.cli()

    def write_config(self) -> None:
        apps = [self._app(p.name, p.argv) for p in self.programs]
        (self.dir / "ecosystem.json").write_text(json.dumps({"apps": apps}, indent=1))

    def _app(self, name: str, argv: tuple[str, ...]) -> dict[str, Any]:
        s = self.settings
        app: dict[str, Any] = {
            "name": name,
            "script": argv[0],
            "args": list(argv[1:]),
            "interpreter": "none",
            "exec_mode": "fork",
            "cwd": str(self.dir),
            "autorestart": not s.oneshot,
            "out_file": str(self.log_path(name)),
            "error_file": str(self.err_path(name)),
            "time": False,
            "vizion": False,
            "kill_timeout": 5000,
        }
        if s.fast_restart:
            # No delay, and a run of 0.5 s already counts as stable (not "unstable restarts").
            app.update(restart_delay=0, min_uptime=500, max_restarts=100000)
        return app

    def start(self) -> None:
        super().start()
        assert self.proc is not None
        try:
            code = self.proc.wait(CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise common.BenchError(f"pm2 start took over {CLI_TIMEOUT:g}s") from None
        if code != 0:
            raise common.BenchError(f"pm2 start exited {code}: {self.output_tail()}")

    def detached(self) -> bool:
        return True

    def daemon_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.home / "pm2.pid").read_text().strip())
        return None

    def supervisor_pids(self) -> list[int]:
        pid = self.daemon_pid()
        return [pid] if pid is not None else []

    def assert_alive(self) -> None:
        pid = self.daemon_pid()
        if pid is not None and not pid_alive(pid):
            raise common.BenchError(f"the pm2 daemon (pid {pid}) is gone: {self.output_tail()}")

    def graceful_stop(self, timeout: float) -> None:
        pid = self.daemon_pid()
        if pid is None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                self.cli("kill"),
                cwd=self.dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                start_new_session=True,
            )
        wait_gone([pid], 10.0)
