"""What every subcommand shares: the one error type that ``main`` prints
(``guarded``: the one place it becomes a message and an exit code), loading
the config for a command (stdlib only until a config is read), and
``escape``, the one way text from elsewhere reaches an operator's terminal."""

from __future__ import annotations

import os
import sys

from supervisor.protocol import DEFAULT_CONFIG as DEFAULT_CONFIG
from supervisor.protocol import EXIT_FAILED as EXIT_FAILED
from supervisor.protocol import EXIT_NOT_RUNNING as EXIT_NOT_RUNNING
from supervisor.protocol import EXIT_OK as EXIT_OK
from supervisor.protocol import EXIT_USAGE as EXIT_USAGE

EXIT_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away, as shells report for `seq 1e9 | head`

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Callable

    from supervisor import config as configmod


class CLIError(Exception):
    """Printed as ``gosup: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def guarded(command: Callable[[], int]) -> int:
    """Run ``command``; the exit code, with every error turned into a message."""
    try:
        code = command()
        sys.stdout.flush()  # inside the try: a reader that went away is seen here
    except CLIError as exc:  # messages name paths and programs, and relay gosup's errors
        print(f"gosup: {escape(exc, lines=True)}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """stdout's reader went away (``gosup history | head``): end quietly, with
    the status of a command killed by SIGPIPE (as ``git log | head`` does)."""
    # Python would flush stdout again at exit and complain; point it at /dev/null.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_PIPE


def load_config(path: str) -> configmod.AppConfig:
    """The config at ``path``, or a CLIError (exit 2) naming every problem."""
    # Imported here: the config module alone is ~40% of `gosup status`'s time.
    from supervisor import config as configmod

    try:
        return configmod.load(path)
    except configmod.ConfigError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None


# -- escaping -----------------------------------------------------------------------
#
# What gosup prints for humans often came from somewhere else: a program's
# stderr (crash messages, output tails), a validator, a file name, an error
# naming a path. A terminal interprets control characters in it: ESC starts
# sequences that move the cursor, clear lines, set the window title or (on
# some terminals) answer back as if typed; 8-bit C1 codes like CSI (0x9b) do
# the same on others; bidirectional overrides reorder what is shown. So all
# of them are shown, never sent: C0 (but newline and tab where lines are
# wanted), DEL and C1 as ``\xNN``, the bidi controls as ``\uNNNN``. Printable
# text, other languages and emoji pass unchanged. ``--json`` output is never
# escaped this way (JSON escapes controls itself and stays exact).

_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_TABLE = {c: f"\\x{c:02x}" for c in _CONTROLS} | {c: f"\\u{c:04x}" for c in _BIDI}
_ONE_LINE = str.maketrans(_TABLE)
_LINES = str.maketrans({c: v for c, v in _TABLE.items() if c not in (0x09, 0x0A)})


def escape(text: object, lines: bool = False) -> str:
    """``text`` safe to print on a terminal: control characters shown as
    ``\\x1b`` etc. With ``lines``, newlines and tabs are kept."""
    text = str(text)
    if text.isprintable():  # the common case, in C: every character escaped is unprintable
        return text
    return text.translate(_LINES if lines else _ONE_LINE)
