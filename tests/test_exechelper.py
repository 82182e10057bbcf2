"""The parent-death helper (supervisor/core/exechelper.py): a static program
in a sealed memfd that sets PR_SET_PDEATHSIG and execs the program, in place
of setpriv's dynamically linked exec (about 1 ms of every restart, issue 18).
It must pass argv and the environment through exactly, say why an exec
failed, and its children must die with their parent, even by SIGKILL."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import pid_alive, wait_for

from supervisor.core import exechelper, spawn

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the helper is x86-64 code; elsewhere setpriv is used"
)


def test_the_helper_runs_the_program_with_its_argv_and_environment_untouched() -> None:
    helper = exechelper.path()
    assert helper is not None and helper.startswith(f"/proc/{os.getpid()}/fd/")
    args = ["a b", "", "*", "ünï", "--x=$HOME"]
    code = "import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ)]))"
    env = {"ONE": "1", "SPACE": "a b", "EMPTY": ""}
    done = subprocess.run(
        [helper, sys.executable, "-I", "-S", "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    argv, seen = json.loads(done.stdout)
    assert argv == args
    assert {k: v for k, v in seen.items() if k != "LC_CTYPE"} == env


def test_an_exec_that_fails_says_so_and_exits_as_a_shell_would(tmp_path: Path) -> None:
    helper = exechelper.path()
    assert helper is not None
    missing = subprocess.run([helper, str(tmp_path / "nope")], capture_output=True, timeout=30)
    assert (missing.returncode, missing.stderr) == (127, b"gosup: cannot execute the program\n")
    text = tmp_path / "text"
    text.write_text("not a program\n")
    text.chmod(0o644)
    refused = subprocess.run([helper, str(text)], capture_output=True, timeout=30)
    assert (refused.returncode, refused.stderr) == (126, b"gosup: cannot execute the program\n")


def test_the_memfd_is_sealed_and_never_inherited() -> None:
    helper = exechelper.path()
    assert helper is not None
    fd = int(helper.rsplit("/", 1)[1])
    assert os.get_inheritable(fd) is False
    with pytest.raises(OSError):
        os.pwrite(fd, b"x", 0)  # F_SEAL_WRITE
    assert os.pread(fd, 400, 0) == exechelper.elf()


_PARENT = """
import time
from pathlib import Path
from supervisor.core import spawn
p = spawn.start_child(["sleep", "300"], Path("."), {"PATH": "/usr/bin:/bin"})
print(p.pid, flush=True)
time.sleep(300)
"""


def test_a_child_started_through_it_dies_with_its_sigkilled_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(spawn.__file__).parents[2])},
        stdout=subprocess.PIPE,
        text=True,
    )
    child: int | None = None
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        wait_for(  # the helper exec'd it: the pid is the program's now
            lambda: os.readlink(f"/proc/{child}/exe").endswith("/sleep"), 10, "sleep to run"
        )
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        wait_for(lambda: not pid_alive(child), 10, "the child to die with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
        if parent.stdout is not None:
            parent.stdout.close()
        if child is not None and pid_alive(child):
            os.kill(child, signal.SIGKILL)


def test_gosup_starts_a_plain_program_through_it_and_a_user_switch_through_setpriv() -> None:
    helper = exechelper.path()
    assert spawn._death_signal_argv(["/bin/true"], plain=True) == ([helper, "/bin/true"], None)
    # Not as its own user (a switch, capabilities), or a path to search: setpriv.
    for argv, plain in ((["/bin/true"], False), (["true"], True)):
        wrapped, _ = spawn._death_signal_argv(argv, plain=plain)
        assert wrapped[0] != helper and wrapped[-len(argv) :] == argv
