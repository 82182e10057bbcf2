"""What gosup prints for humans is escaped (issue 16.4): a program's words (its
stderr, a validator's output), errors naming paths, anything from a file,
reach the operator's terminal with control characters shown (``\\x1b``),
never interpreted; ``--json`` keeps them exact. `gosup logs` is covered in
test_logs_cli.py.

Against a real `gosup run` and the goapp fixture: `-fail-start TEXT` prints
TEXT to stderr and exits 1; shaped like a Go panic, TEXT's message becomes
the crash message of the history and of `gosup status`. A validator (sh)
that prints it puts it in `gosup stage`'s verdict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from conftest import Gosup
from test_configsync import V0, V1, make_live
from test_control import started, status

from supervisor.cli.common import escape

Factory = Callable[..., Gosup]

# Sets the terminal's title, clears the screen, an 8-bit CSI, a right-to-left override.
EVIL = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil"
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


# A validator that says EVIL on stderr and refuses {file}.
VALIDATOR = ["/bin/sh", "-c", 'printf "%s\\n" "$1" >&2; exit 1', "sh", EVIL, "{file}"]


def toml_str_list(items: list[str]) -> str:
    return "[" + ", ".join(map(toml_str, items)) + "]"


def toml_str(text: str) -> str:
    return json.dumps(text)  # JSON's \\u escapes are TOML's too


def assert_escaped(text: str) -> None:
    assert not any(c in text for c in RAW), repr(text)
    assert SHOWN in text, text


def test_the_helper() -> None:
    assert escape(EVIL) == SHOWN
    assert escape("a\nb\tc") == "a\\x0ab\\x09c"
    assert escape("a\nb\tc\r", lines=True) == "a\nb\tc\\x0d"
    assert escape("naïve 😀 日本") == "naïve 😀 日本"


def test_status_and_history_show_a_programs_words_escaped(
    gosup_factory: Factory, goapp: Path
) -> None:
    panic = f"panic: {EVIL}\n\ngoroutine 1 [running]:\nmain.main()\n\t/src/main.go:7 +0x1d"
    text = (
        "[programs.crashy]\n"
        f'command = ["{goapp}", "-fail-start", {toml_str(panic)}]\n'
        'restart = "never"\n'
    )
    g = started(gosup_factory(text))
    g.wait_event("exited", "crashy")

    r = g.cli("status")
    assert r.returncode == 0, r.stderr
    assert_escaped(r.stdout)  # the crash message, read from the program's stderr
    data = status(g)  # --json: exact
    assert data["crashy"]["last_exit"]["crash"]["message"] == EVIL

    r = g.cli("history")
    assert r.returncode == 0, r.stderr
    assert_escaped(r.stdout)
    r = g.cli("history", "--json")
    crashes = [json.loads(line).get("crash") for line in r.stdout.splitlines()]
    assert any(crash and crash["message"] == EVIL for crash in crashes)

    r = g.cli("restart", EVIL)  # the server's error names it: escaped on stderr
    assert r.returncode == 1
    assert not any(c in r.stderr for c in RAW) and SHOWN in r.stderr


def test_stage_shows_the_validators_words_escaped(gosup_factory: Factory, goapp: Path) -> None:
    text = (
        "[programs.api]\n"
        f'command = ["{goapp}"]\n'
        'start_seconds = "200ms"\n'
        "[[programs.api.config_files]]\n"
        'path = "config/app.conf"\n'
        f"validate = {toml_str_list(VALIDATOR)}\n"
    )
    g = gosup_factory(text)
    make_live(g.dir, V0)
    started(g)
    new = g.dir / "new.conf"
    new.write_bytes(V1)
    r = g.cli("stage", str(new), "config/app.conf", "--wait", "30")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "rejected: validation_failed" in r.stdout
    assert_escaped(r.stdout)
    assert os.path.exists(g.dir / "config" / "app.conf.new.rejected")
