"""What every subcommand shares: the one error type that ``main`` prints,
and loading the config for a command (stdlib only until a config is read)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.protocol import DEFAULT_CONFIG as DEFAULT_CONFIG
from supervisor.protocol import EXIT_FAILED as EXIT_FAILED
from supervisor.protocol import EXIT_NOT_RUNNING as EXIT_NOT_RUNNING
from supervisor.protocol import EXIT_OK as EXIT_OK
from supervisor.protocol import EXIT_USAGE as EXIT_USAGE

if TYPE_CHECKING:
    from supervisor import config as configmod


class CLIError(Exception):
    """Printed as ``gosup: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def load_config(path: str) -> configmod.AppConfig:
    """The config at ``path``, or a CLIError (exit 2) naming every problem."""
    # Imported here: the config module alone is ~40% of `gosup status`'s time.
    from supervisor import config as configmod

    try:
        return configmod.load(path)
    except configmod.ConfigError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
