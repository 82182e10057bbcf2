"""supervisord (from PyPI, in bench/.cache/venv): `supervisord -n -c supervisord.conf`."""

from __future__ import annotations

import os
import shlex

from drivers import Driver, _install


def _v(value: str) -> str:
    return value.replace("%", "%%")  # supervisord expands %(name)s in values


class SupervisordDriver(Driver):
    name = "supervisord"
    reset_window = 1.0  # startsecs's default: a run that reached RUNNING restarts at once

    def command(self) -> list[str]:
        return [str(_install.venv_bin("supervisord")), "-n", "-c", "supervisord.conf"]

    def ctl_command(self) -> list[str]:
        """supervisorctl talking to this instance (for the status CLI benchmark)."""
        return [str(_install.venv_bin("supervisorctl")), "-c", str(self.dir / "supervisord.conf")]

    def write_config(self) -> None:
        d = _v(str(self.dir))
        parts = [
            "[supervisord]",
            "nodaemon = true",
            "user = root" if os.geteuid() == 0 else "",
            f"logfile = {d}/supervisord.log",
            f"pidfile = {d}/supervisord.pid",
            f"childlogdir = {d}/logs",
            "",
            # The control socket every real deployment has (supervisorctl needs it).
            "[unix_http_server]",
            f"file = {d}/supervisor.sock",
            "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "",
            "[supervisorctl]",
            f"serverurl = unix://{d}/supervisor.sock",
        ]
        for prog in self.programs:
            parts += ["", *self._program(prog.name, prog.argv)]
        (self.dir / "supervisord.conf").write_text("\n".join(parts) + "\n")

    def _program(self, name: str, argv: tuple[str, ...]) -> list[str]:
        s = self.settings
        # startsecs = 0: RUNNING at once, so a crash of a healthy program goes
        # EXITED -> STARTING without BACKOFF (the default 1s would put a kill
        # soon after a restart into BACKOFF with a delay).
        startsecs = 0 if (s.fast_restart or s.oneshot) else 1
        autorestart = "false" if s.oneshot else "true"
        return [
            f"[program:{name}]",
            f"command = {_v(shlex.join(argv))}",
            f"directory = {_v(str(self.dir))}",
            "autostart = true",
            f"autorestart = {autorestart}",
            f"startsecs = {startsecs}",
            f"startretries = {0 if s.oneshot else 3}",
            "stopsignal = TERM",
            "stopwaitsecs = 5",
            f"stdout_logfile = {_v(str(self.log_path(name)))}",
            "stdout_logfile_maxbytes = 0",
            "stdout_logfile_backups = 0",
            f"stderr_logfile = {_v(str(self.err_path(name)))}",
            "stderr_logfile_maxbytes = 0",
            "stderr_logfile_backups = 0",
        ]
