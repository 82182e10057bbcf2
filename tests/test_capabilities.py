"""`capabilities = [...]`: ambient capabilities kept after the user switch.

The real thing: a program running as an unprivileged user (created with
useradd) binds a port below 1024 with CAP_NET_BIND_SERVICE, and cannot
without it; `gosup check` refuses capabilities gosup could not grant.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, wait_for

from supervisor import config as configmod

USER = f"gosupcaps{os.getpid()}"  # one per test run: suites may run side by side


@pytest.fixture
def unprivileged_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("creating a user and switching to it needs root")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    subprocess.run(["userdel", USER], capture_output=True, check=False)
    argv = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER]
    # useradd fails at once when another one holds /etc/passwd's lock: try again.
    wait_for(lambda: subprocess.run(argv, capture_output=True).returncode == 0, 30, "useradd")
    try:
        yield USER
    finally:
        subprocess.run(["userdel", USER], capture_output=True, check=False)


def _free_low_port(exclude: int = 0) -> int:
    # In random order: two test runs side by side must not both take the first free one.
    for port in random.sample(range(900, 1000), 100):
        if port == exclude:
            continue
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port))
            return port
    pytest.skip("no free port below 1024")


def _program(name: str, binary: Path, port: int, caps: str) -> str:
    return (
        f"[programs.{name}]\n"
        f'command = ["{binary}", "-http", "127.0.0.1:{port}"]\n'
        f'directory = "{binary.parent}"\nuser = "{USER}"\nstart_seconds = "300ms"\n{caps}\n'
        f"[programs.{name}.backoff]\ngive_up_after = 1\n"
    )


def _capabilities(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {
        key: int(value.strip(), 16)
        for key, _, value in (line.partition(":") for line in status)
        if key in ("CapInh", "CapPrm", "CapEff", "CapAmb")
    }


def test_a_user_binds_below_1024_with_cap_net_bind_service(
    gosup_factory: Any, public_goapp: Path, unprivileged_user: str
) -> None:
    with_cap = _free_low_port()
    without = _free_low_port(exclude=with_cap)
    g = gosup_factory(
        _program("web", public_goapp, with_cap, 'capabilities = ["CAP_NET_BIND_SERVICE"]')
        + _program("bare", public_goapp, without, "")
    ).start()
    pid = g.running_pid("web")
    assert Path(f"/proc/{pid}").stat().st_uid != 0
    bit = 1 << configmod.CAPABILITIES["CAP_NET_BIND_SERVICE"]
    caps = _capabilities(pid)
    assert caps["CapAmb"] == bit and caps["CapEff"] == bit, caps
    body = wait_for(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{with_cap}/healthz", timeout=5).read(),
        what="the program answering on its low port",
    )
    assert body
    # Without the capability the same bind fails: the program goes FATAL.
    fatal = g.wait_event("fatal", "bare")
    assert fatal
    assert "permission denied" in (g.log_dir / "bare.stderr.log").read_text()
    assert g.stop() == 0


def test_unknown_capability_is_a_config_error(tmp_path: Path) -> None:
    app = tmp_path / "app.toml"
    app.write_text('[programs.a]\ncommand = ["true"]\ncapabilities = ["CAP_NET_BIND_SERVIS"]\n')
    with pytest.raises(configmod.ConfigError) as err:
        configmod.load(app)
    assert "programs.a.capabilities: unknown capability 'CAP_NET_BIND_SERVIS'" in str(err.value)
    assert "did you mean CAP_NET_BIND_SERVICE?" in str(err.value)


def test_check_and_run_refuse_capabilities_gosup_cannot_grant(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the refusal is shown against a root gosup that lacks one")
    app = tmp_path / "app.toml"
    app.write_text('[programs.a]\ncommand = ["/bin/true"]\ncapabilities = ["net_bind_service"]\n')

    def gosup(*args: str, drop: bool) -> subprocess.CompletedProcess[str]:
        # gosup as root, but with CAP_NET_BIND_SERVICE out of its bounding set
        # (a unit's CapabilityBoundingSet=, a container's dropped capabilities).
        wrap = ["setpriv", "--bounding-set=-net_bind_service", "--"] if drop else []
        return subprocess.run(
            [*wrap, sys.executable, "-m", "supervisor", *args, str(app)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    why = "programs.a.capabilities: cannot grant CAP_NET_BIND_SERVICE"
    assert gosup("check", drop=False).returncode == 0
    # What a root gosup cannot grant, no gosup can: `check` run as root refuses
    # it (exit 2), and so does `run`. (As another user, `check` warns: it may
    # run as another user than gosup, like for `user =`.)
    checked = gosup("check", drop=True)
    assert checked.returncode == 2 and "warning: " not in checked.stderr, checked
    assert why in checked.stderr
    refused = gosup("run", drop=True)
    assert refused.returncode == 2 and why in refused.stderr, refused
