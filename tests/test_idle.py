"""What an idle gosup and `gosup status` cost (issue 18): only what the
configuration uses is imported, an idle gosup rarely wakes up, orphans are
still reaped, and `gosup status` imports only what it prints.

Real gosup, real Go children, real signals; every wait has a deadline. The
speed itself is measured in bench/ (overhead.py, status_cli.py), beside
supervisord: these tests pin down what makes it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from conftest import Gosup, wait_for

OPTIONAL = ("prometheus_client", "watchdog", "pathspec")


def _program(goapp: Path, name: str, extra: str = "") -> str:
    argv = json.dumps([str(goapp), "-name", name])
    return f'[programs.{name}]\ncommand = {argv}\nstart_seconds = "100ms"\n{extra}\n'


def _imported(g: Gosup) -> set[str]:
    """Top-level packages gosup imported (PYTHONPROFILEIMPORTTIME's lines on its stderr)."""
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in g.log().splitlines()
        if line.startswith("import time:")
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_plain_config_imports_no_optional_library(gosup_factory: Any, goapp: Path) -> None:
    g = gosup_factory(_program(goapp, "a"))
    g.start({"PYTHONPROFILEIMPORTTIME": "1"})
    g.running_pid("a")
    assert g.cli("status").returncode == 0
    assert not _imported(g) & set(OPTIONAL), "imported without a use in app.toml"
    assert g.stop() == 0


def test_what_the_config_uses_is_imported(gosup_factory: Any, goapp: Path, tmp_path: Path) -> None:
    (tmp_path / "api.yaml").write_text("v: 1\n")
    port = _free_port()
    g = gosup_factory(
        f'[supervisor]\nmetrics_listen = "127.0.0.1:{port}"\n\n'
        + _program(goapp, "a", '\n[[programs.a.config_files]]\npath = "api.yaml"\n')
    )
    g.start({"PYTHONPROFILEIMPORTTIME": "1"})
    g.running_pid("a")
    assert {"prometheus_client", "watchdog"} <= _imported(g)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = b""
        while chunk := conn.recv(65536):
            body += chunk
    assert b"gosup_event_loop_lag_seconds" in body
    assert g.stop() == 0


def _sleeps(pid: int) -> int:
    """How often gosup's loop thread has gone to sleep (voluntary context switches)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


def test_an_idle_gosup_rarely_wakes_up(gosup_factory: Any, goapp: Path) -> None:
    """Its children a quarter of a minute old, gosup's loop wakes for the
    sampler and a slow pulse only: before issue 18 a 250 ms pulse and a
    reaper that walked /proc every second woke it ~60 times in 10 s."""
    g = gosup_factory("".join(_program(goapp, f"p{i}") for i in range(3))).start()
    for i in range(3):
        g.running_pid(f"p{i}")
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 15, 30, "the children to age")
    before, t0 = _sleeps(g.pid), time.monotonic()
    wait_for(lambda: time.monotonic() - t0 > 10, 30, "10 s idle")
    woke = (_sleeps(g.pid) - before) / (time.monotonic() - t0) * 10
    assert woke < 30, f"the loop woke {woke:.0f} times in 10 s"
    assert g.stop() == 0


def test_an_orphan_of_a_program_is_reaped(gosup_factory: Any) -> None:
    """gosup is the subreaper: a double-forked helper that exits is its zombie
    until the reaper (woken by SIGCHLD, no longer by a timer) reaps it."""
    orphaner = "(exec sleep 1.5 &); exec sleep 600"
    g = gosup_factory(
        f'[programs.o]\ncommand = ["/bin/sh", "-c", {json.dumps(orphaner)}]\n'
        'start_seconds = "100ms"\n'
    ).start()
    g.running_pid("o")

    def orphan() -> int | None:
        for child in psutil.Process(g.pid).children():
            try:
                if child.cmdline()[-1:] == ["1.5"]:
                    return child.pid
            except psutil.Error:
                continue
        return None

    pid = wait_for(orphan, 15, "the orphan, a child of gosup")
    wait_for(lambda: not psutil.pid_exists(pid), 20, "the orphan's exit and its reaping")
    assert g.stop() == 0


# -- gosup status ----------------------------------------------------------------------

HEAVY_FOR_STATUS = {"argparse", "socket", "selectors", "asyncio", "psutil", "loguru"}


def _status(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "supervisor", "status", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in r.stderr.splitlines() if line.startswith("import time:")]
    return r, {line.split("|")[-1].strip() for line in lines}


def test_status_imports_only_what_it_prints(tmp_path: Path) -> None:
    (tmp_path / "app.toml").write_text('[programs.a]\ncommand = ["x"]\n')
    r, imported = _status(tmp_path)
    assert r.returncode == 3, r.stderr  # nobody runs there: found the socket, tried it
    assert str(tmp_path / ".gosup" / "gosup.sock") in r.stderr
    assert not imported & HEAVY_FOR_STATUS, sorted(imported & HEAVY_FOR_STATUS)
    # Given the socket, not even app.toml's parser (tomllib, which imports typing).
    r, imported = _status(tmp_path, "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 3, r.stderr
    light = HEAVY_FOR_STATUS | {"typing", "tomllib"}
    assert not imported & light, sorted(imported & light)


def test_status_through_the_short_path_prints_like_argparse(
    gosup_factory: Any, goapp: Path
) -> None:
    g = gosup_factory(_program(goapp, "a")).start()
    pid = g.running_pid("a")
    short = g.cli("status", "--json")
    full = g.cli("status", "--json", "--config", str(g.config), "a")
    assert short.returncode == full.returncode == 0, (short.stderr, full.stderr)
    assert json.loads(short.stdout)["programs"][0]["pid"] == pid
    assert json.loads(full.stdout)["programs"][0]["name"] == "a"
    assert g.cli("status", "--bogus").returncode == 2  # argparse's usage error, as before
    # A running gosup whose app.toml says state_dir plainly: found without tomllib.
    r, imported = _status(g.config.parent, "-c", str(g.config))
    assert r.returncode == 0, r.stderr
    assert not imported & (HEAVY_FOR_STATUS | {"tomllib"}), sorted(imported)
    assert g.stop() == 0


def test_status_guesses_the_socket_only_from_a_plain_state_dir(tmp_path: Path) -> None:
    """The guess (no tomllib) must not lose a state_dir however the key is
    written, and nobody at the guessed socket means the file is parsed whole:
    a file that is not TOML is a config error (exit 2), never "not running"."""
    for name, text in (
        ("plain", '[supervisor]  # ours\r\nstate_dir = "run/one"  # here\r\n'),
        ("literal", "[programs.a]\nx = 1\n[ supervisor ]\nstate_dir = 'run/two'\n"),
        ("dotted", 'supervisor.state_dir = "run/three"\n'),
        ("escaped", '[supervisor]\n"state\\u005fdir" = "run/four"\n'),
        ("inline", 'supervisor = { state_dir = "run/five" }\n'),
        (
            "hidden",
            '[supervisor]\nstate_dir = "run/six"\n[programs.a]\nx = """\n[supervisor]\n'
            'state_dir = "run/not-this"\n"""\n',
        ),
    ):
        config = tmp_path / f"{name}.toml"
        config.write_text(text)
        r, _ = _status(tmp_path, "-c", str(config))
        want = tmp_path / "run" / text.split("run/")[1].split(text[text.index("run/") - 1])[0]
        assert r.returncode == 3 and str(want / "gosup.sock") in r.stderr, (name, r.stderr)
    broken = tmp_path / "broken.toml"
    broken.write_text('[supervisor]\nstate_dir = "run/seven"\n[programs\n')
    r, _ = _status(tmp_path, "-c", str(broken))
    assert r.returncode == 2 and "broken.toml" in r.stderr, r.stderr


def test_a_reload_settles_only_what_it_built_until_enough_programs_left() -> None:
    """A full settle collects the frozen heap too (a removed program's cycles);
    at 1,000 programs that held the loop 100-280 ms one second after every
    reload, so a reload settles in full only every SETTLE_FULL_AFTER removed
    or restarted programs, and otherwise collects only what it built."""
    import gc
    import weakref

    from supervisor.service import daemon

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle  # type: ignore[attr-defined]
    gone = weakref.ref(cycle)
    gc.freeze()  # the start-up heap, settled: the cycle is in it
    try:
        del cycle
        fresh = Node()
        fresh.me = fresh  # type: ignore[attr-defined]
        fresh_gone = weakref.ref(fresh)
        del fresh
        daemon._settle_heap(full=False)
        assert fresh_gone() is None, "what the reload built is collected"
        assert gone() is not None, "the frozen heap is not walked"
        daemon._settle_heap(full=True)
        assert gone() is None, "a full settle collects the frozen cycle"
    finally:
        gc.unfreeze()


def test_reloads_settle_in_full_once_enough_programs_have_left(
    tmp_path: Path, goapp: Path, monkeypatch: Any
) -> None:
    import asyncio

    from supervisor import config as configmod
    from supervisor.service import app, daemon

    settles: list[bool] = []
    settled = asyncio.Event()

    def settle(full: bool = True) -> None:
        settles.append(full)
        settled.set()

    monkeypatch.setattr(daemon, "_settle_heap", settle)
    monkeypatch.setattr(daemon, "SETTLE_FULL_AFTER", 2)
    path = tmp_path / "app.toml"

    def write(names: list[str], env: str = "x") -> None:
        head = f'[supervisor]\nstate_dir = "{tmp_path}/state"\nlog_dir = "{tmp_path}/logs"\n'
        progs = "".join(
            f'[programs.{n}]\ncommand = ["{goapp}"]\nautostart = false\n'
            f'environment = {{ E = "{env}" }}\n'
            for n in names
        )
        path.write_text(head + progs)

    async def main() -> None:
        write(["a", "b", "c"])
        sup = app.build(configmod.load(path))
        try:
            for spec in sup.config.programs:
                await sup._add_program(spec)
            # a removed (1 left), b removed (2: in full), c restarted (1 left)
            for names, env in ((["b", "c"], "x"), (["c"], "x"), (["c"], "y")):
                write(names, env)
                settled.clear()
                await sup.reload()
                async with asyncio.timeout(10):  # the settle comes a second later
                    await settled.wait()
        finally:
            for program in list(sup.programs.values()):
                await program.close()
            sup.history.close()

    asyncio.run(main())
    assert settles == [False, True, False]
