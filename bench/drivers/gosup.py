"""gosup: `gosup run app.toml --no-echo` in the foreground."""

from __future__ import annotations

import json

import common

from drivers import Driver, _install


def _s(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for our paths and args


class GosupDriver(Driver):
    name = "gosup"
    reset_window = 60.0  # backoff.reset_after's default

    def env(self) -> dict[str, str]:
        env = common.bench_env(self.tag)  # gosup is this project: keep its Python path
        if self.settings.sampling_off:
            env["GOSUP_SAMPLING"] = "0"
        return env

    def command(self) -> list[str]:
        return [
            _install.gosup_python(),
            "-m",
            "supervisor",
            "run",
            "app.toml",
            "--no-echo",
        ]

    def ctl_command(self) -> list[str]:
        """The gosup CLI; run it with cwd = the work directory (it finds ./app.toml)."""
        return [_install.gosup_python(), "-m", "supervisor"]

    def write_config(self) -> None:
        parts = [
            "[supervisor]",
            'state_dir = ".gosup"',
            'log_dir = "logs"',
            'shutdown_timeout = "60s"',
        ]
        for prog in self.programs:
            parts += ["", *self._program(prog.name, prog.argv)]
        (self.dir / "app.toml").write_text("\n".join(parts) + "\n")

    def _program(self, name: str, argv: tuple[str, ...]) -> list[str]:
        s = self.settings
        lines = [
            f"[programs.{name}]",
            f"command = [{', '.join(_s(a) for a in argv)}]",
            f"directory = {_s(str(self.dir))}",
            f'restart = "{"never" if s.oneshot else "on-failure"}"',
            'stop_timeout = "5s"',
        ]
        if s.fast_restart:
            # A run that lasted reset_after was healthy: its crash restarts at once.
            lines += ['start_seconds = "100ms"', "", f"[programs.{name}.backoff]"]
            lines += ['reset_after = "500ms"']
        lines += ["", f"[programs.{name}.logs]", 'max_size = "1GiB"', "backups = 1"]
        if s.sampling:
            # Sampling on, with a limit no idle program reaches (nothing is ever acted on).
            lines += ["", f"[programs.{name}.limits]", 'interval = "5s"', 'rss = "8GiB"']
        return lines
