"""What the client and the daemon agree on (stdlib only, cheap to import).

The control protocol itself (framing, commands, replies) is described in
docs/control.md and served by ``supervisor/service/control.py``; the client
is ``supervisor/cli/client.py``. Both take their names and limits from here.
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: `gosup status` is light
if TYPE_CHECKING:
    from typing import Any

SOCKET_NAME = "gosup.sock"  # <state_dir>/gosup.sock
LOCK_NAME = "gosup.lock"  # <state_dir>/gosup.lock: flock held for gosup's life
HISTORY_NAME = "history.jsonl"  # <state_dir>/history.jsonl
DEFAULT_STATE_DIR = ".gosup"  # relative to the config file's directory
DEFAULT_CONFIG = "app.toml"
MAX_REQUEST = 1 << 20  # bytes per request line (the newline excluded)
# seconds a reload_command may take before the reload counts as failed
# (files/probation.py); `gosup stage` counts it in how long it waits.
RELOAD_COMMAND_TIMEOUT = 30.0
# What a program may be called: app.toml's [programs.NAME], and so log file
# names and the NAME of `gosup logs`.
PROGRAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# Exit codes of every gosup command.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


class RequestError(Exception):
    """A request that cannot be served: becomes ``{"ok": false, "error": ...}``.

    Raised by the server's command handlers, including those that other parts
    of the daemon (the sampler's ``dump``) hand to the server.
    """

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.data = data
