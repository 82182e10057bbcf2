"""What ``gosup check`` can know about a config beyond its syntax.

The file parses, yet a program may still be doomed: its ``command[0]`` is
not there or not executable (a typo, a binary not deployed yet). gosup
would take it, the program would go FATAL, and ``gosup check`` in
``ExecStartPre`` would have let systemd start it all the same. Found here,
it is an error; a warning instead when the program has a ``[build]`` section
(dev mode builds the binary before the first start).

The binary is looked up with the helper that starts programs
(`supervisor.core.spawn.resolve_executable`), against the program's
directory and PATH, so the verdict is the one the start would give.
"""

from __future__ import annotations

from supervisor.config import AppConfig
from supervisor.core import spawn


def findings(config: AppConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings) about the programs' binaries, each naming file and key."""
    errors: list[str] = []
    warnings: list[str] = []
    base = spawn.base_environment()
    for spec in config.programs:
        env = {**base, **spec.environment}
        try:
            spawn.resolve_executable(spec.command[0], spec.directory, env)
        except spawn.SpawnError as exc:
            where = f"{config.path}: programs.{spec.name}.command"
            if spec.build is not None:
                warnings.append(f"{where}: {exc} (its [build] is expected to produce it)")
            else:
                errors.append(f"{where}: {exc}")
    return errors, warnings
