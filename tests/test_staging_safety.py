"""Staged files against a hostile deploy user (issue 16, docs/security.md):
sidecars and staged files are opened without following links or blocking,
must be regular files of a bounded size, and every refused version is
recorded. Also the guarantees that already held and must keep holding: a
malformed control request never hurts gosup, a SIGKILL during a swap never
tears the live file, modes stay sensible, no temporary file is left behind.

Against a real `gosup run`, the goapp fixture, real files, FIFOs and links.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from conftest import Gosup, wait_for
from test_configsync import POISON, V0, V1, app_toml, make_live, read, sha, stage
from test_control import prog, raw, started, status, wait_state

from supervisor.files import configswap as swap

Factory = Callable[..., Gosup]
V2 = b"version 2\n"


def staging_of(g: Gosup) -> Path:
    return g.dir / "config" / "app.conf.new"


def drop(g: Gosup, content: bytes) -> None:
    """Rename a file with ``content`` onto the staging path (the sidecar is the caller's)."""
    tmp = g.dir / "config" / ".incoming"
    tmp.write_bytes(content)
    os.rename(tmp, staging_of(g))


def reason_is(reason: str) -> Callable[[dict[str, object]], bool]:
    return lambda rec: rec.get("reason") == reason


def running_gosup(gosup_factory: Factory, goapp: Path, **keys: str) -> tuple[Gosup, Path]:
    g = gosup_factory(app_toml(goapp, **keys))
    live = make_live(g.dir)
    started(g)
    g.running_pid("api")
    return g, live


# -- sidecars ------------------------------------------------------------------------------


def test_a_fifo_sidecar_is_refused_and_gosup_still_stops(
    gosup_factory: Factory, goapp: Path
) -> None:
    """Before: the worker blocked for good opening the FIFO; later deploys stayed
    queued and `gosup shutdown` never ended."""
    g, live = running_gosup(gosup_factory, goapp)
    os.mkfifo(swap.sidecar_of(staging_of(g)))
    drop(g, V1)
    rec = g.wait_event("config_rejected", "api", where=reason_is("not_a_regular_file"))[0]
    assert rec["actual"] == sha(V1) and "sidecar" in rec["error"]
    wait_for(lambda: not swap.sidecar_of(staging_of(g)).exists(), what="the FIFO consumed")
    assert live.read_bytes() == V0
    stage(g, V2)  # the next deploy is handled
    g.wait_event("config_applied", "api", where=lambda r: r["sha256"] == sha(V2))
    r = g.cli("shutdown", timeout=30)
    assert r.returncode == 0, r.stderr
    assert g.proc is not None and g.proc.wait(30) == 0


def test_a_sidecar_linked_to_dev_zero_is_refused_without_reading(
    gosup_factory: Factory, goapp: Path
) -> None:
    """Before: gosup read /dev/zero through the link until its RSS passed 2.5 GB,
    and the staged version vanished without a record."""
    g, live = running_gosup(gosup_factory, goapp)
    swap.sidecar_of(staging_of(g)).symlink_to("/dev/zero")
    drop(g, V1)
    rec = g.wait_event("config_rejected", "api", where=reason_is("not_a_regular_file"))[0]
    assert rec["actual"] == sha(V1)
    wait_for(lambda: not os.path.lexists(swap.sidecar_of(staging_of(g))), what="link consumed")
    assert psutil.Process(g.pid).memory_info().rss < 300 << 20
    assert read(swap.rejected_of(staging_of(g))) == V1 and live.read_bytes() == V0


def test_an_oversized_sidecar_is_refused(gosup_factory: Factory, goapp: Path) -> None:
    g, live = running_gosup(gosup_factory, goapp)
    # A valid hash first, then a megabyte: only the first bytes may ever be read.
    swap.sidecar_of(staging_of(g)).write_text(f"{sha(V1)}  app.conf\n" + "x" * (1 << 20))
    drop(g, V1)
    rec = g.wait_event("config_rejected", "api", where=reason_is("too_large"))[0]
    assert rec["actual"] == sha(V1) and "sidecar" in rec["error"]
    assert live.read_bytes() == V0


# -- staged files ------------------------------------------------------------------------------


def test_an_oversized_staged_file_is_refused_unread(gosup_factory: Factory, goapp: Path) -> None:
    """A sparse file past the limit: refused from its size, never hashed."""
    g, live = running_gosup(gosup_factory, goapp)
    swap.sidecar_of(staging_of(g)).write_text("0" * 64 + "\n")
    tmp = g.dir / "config" / ".huge"
    with open(tmp, "wb") as f:
        f.truncate(swap.STAGED_MAX + 1)
    started_at = time.monotonic()
    os.rename(tmp, staging_of(g))
    rec = g.wait_event("config_rejected", "api", where=reason_is("too_large"))[0]
    assert rec["actual"] is None
    assert time.monotonic() - started_at < 10  # hashing a GiB would not be this quick here
    assert live.read_bytes() == V0


def test_a_hard_link_is_refused_and_its_inode_untouched(
    gosup_factory: Factory, goapp: Path
) -> None:
    """A hard link to a file the deployer does not own (think /etc/shadow, or a
    setuid binary whose hash anyone can compute), with a matching sidecar:
    before, gosup installed it and chmod()ed/chown()ed that inode to the live
    file's mode and owner."""
    g, live = running_gosup(gosup_factory, goapp)
    live.chmod(0o644)
    victim = g.dir / "victim"
    victim.write_bytes(V1)
    victim.chmod(0o600)
    swap.sidecar_of(staging_of(g)).write_text(f"{sha(V1)}  victim\n")
    os.link(victim, staging_of(g))
    rec = g.wait_event("config_rejected", "api", where=reason_is("not_a_regular_file"))[0]
    assert "hard link" in rec["error"]
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert live.read_bytes() == V0
    assert not g.history("api", "config_applied")


def test_a_staged_symlink_to_etc_shadow_is_refused(gosup_factory: Factory, goapp: Path) -> None:
    g, live = running_gosup(gosup_factory, goapp)
    before = os.stat("/etc/shadow") if os.path.exists("/etc/shadow") else None
    swap.sidecar_of(staging_of(g)).write_text("0" * 64 + "\n")
    link = g.dir / "config" / ".incoming"
    link.symlink_to("/etc/shadow")
    os.rename(link, staging_of(g))
    g.wait_event("config_rejected", "api", where=reason_is("not_a_regular_file"))
    assert not live.is_symlink() and live.read_bytes() == V0
    if before is not None:
        after = os.stat("/etc/shadow")
        assert (after.st_mode, after.st_uid, after.st_gid) == (
            before.st_mode,
            before.st_uid,
            before.st_gid,
        )


def test_an_unreadable_sidecar_still_records_the_version(
    gosup_factory: Factory, goapp: Path
) -> None:
    """A sidecar that is a directory: refused and recorded, never silently dropped."""
    g, live = running_gosup(gosup_factory, goapp)
    swap.sidecar_of(staging_of(g)).mkdir()
    drop(g, V1)
    rec = g.wait_event("config_rejected", "api", where=reason_is("not_a_regular_file"))[0]
    assert rec["actual"] == sha(V1)
    assert live.read_bytes() == V0


# -- modes and leftovers ----------------------------------------------------------------------


def test_a_first_version_is_not_left_world_writable(gosup_factory: Factory, goapp: Path) -> None:
    g = gosup_factory(app_toml(goapp, program="autostart = false"))
    (g.dir / "config").mkdir()
    started(g)
    tmp = g.dir / "config" / ".incoming"
    tmp.write_bytes(V1)
    tmp.chmod(0o6777)
    swap.sidecar_of(staging_of(g)).write_text(sha(V1) + "\n")
    os.rename(tmp, staging_of(g))
    g.wait_event("config_applied", "api")
    live = g.dir / "config" / "app.conf"
    assert stat.S_IMODE(live.stat().st_mode) == 0o775


def test_stage_keeps_the_new_file_mode(tmp_path: Path) -> None:
    """`gosup stage` of a binary keeps its execute bits (before: 0644 by umask)."""
    from supervisor.cli.stage import stage_file

    new = tmp_path / "api"
    new.write_bytes(b"#!/bin/sh\n")
    new.chmod(0o750)
    stage_file(new, tmp_path / "bin.new")
    assert stat.S_IMODE((tmp_path / "bin.new").stat().st_mode) == 0o750


def test_no_temporary_file_after_a_rollback_then_an_apply(
    gosup_factory: Factory, goapp: Path
) -> None:
    """Before: `.app.conf.prev.gosup-tmp` stayed (rename(2) between two names of
    one inode does nothing, and the rollback had left .prev and the live file
    as one inode)."""
    g, live = running_gosup(gosup_factory, goapp)
    stage(g, POISON)
    g.wait_event("config_rolled_back", "api")
    g.wait_event("running", "api", count=2)
    stage(g, V1)
    g.wait_event("config_applied", "api", where=lambda r: r["sha256"] == sha(V1))
    assert live.read_bytes() == V1
    left = sorted(p.name for p in live.parent.iterdir() if "gosup-tmp" in p.name)
    assert left == []


# -- what already held --------------------------------------------------------------------------


def test_malformed_control_requests_are_answered_or_closed(
    gosup_factory: Factory, goapp: Path
) -> None:
    """24 hostile requests (random bytes, a 5 MB line, NaN, deep nesting, `../`
    and NUL in names ...): each is answered with an error or the connection
    is closed; gosup and its program are untouched."""
    g = started(gosup_factory(prog(goapp, "a")))
    pid = wait_state(g, "a", "RUNNING")["pid"]
    records = len(g.history())
    path = g.state_dir / "gosup.sock"
    rng = random.Random(24)
    requests = [
        bytes(rng.randrange(256) for _ in range(200)).replace(b"\n", b" "),
        bytes(rng.randrange(1, 128) for _ in range(64)).replace(b"\n", b" "),
        b'{"cmd": "status", "names": [NaN]}',
        b'{"cmd": "history", "n": NaN}',
        b'{"cmd": "history", "n": Infinity}',
        b'{"cmd": "history", "n": -1e400}',
        b'{"cmd": "history", "n": 1e999999}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"cmd": "status", "names": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"cmd": "restart", "names": ["../../etc/passwd"]}',
        b'{"cmd": "restart", "names": ["a\\u0000b"]}',
        b'{"cmd": "dump", "name": "../a"}',
        b'{"cmd": "dump", "name": "a\\u0000"}',
        b'{"cmd": "history", "program": "../../etc/shadow"}',
        b'{"cmd": "signal", "signal": "SIGKILL\\u0000", "names": ["a"]}',
        b'{"cmd": "signal", "signal": 99999, "names": ["a"]}',
        b'{"cmd": "stop", "names": [{"name": "a"}]}',
        b'{"cmd": "status\\u0000"}',
        b'{"cmd": "status", "cmd": "shutdown!"}',
        b'"just a string"',
        b"null",
        b'{"cmd": "\\ud800"}',
    ]
    replies = raw(path, b"\n".join(requests) + b"\n")
    assert len(replies) == len(requests)
    for request, reply in zip(requests, replies, strict=True):
        # Refused, or (a read-only question about a program there is none of) answered empty.
        refused = reply["ok"] is False and reply["error"]
        empty = reply.get("data") == {"records": [], "truncated": False}
        assert refused or empty, (request[:80], reply)
    # A 5 MB line and one that never ends: refused or closed, never buffered.
    for line in (b"x" * (5 << 20) + b"\n", b'{"cmd": "status", "pad": "' + b"y" * (5 << 20)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(path))
            try:
                s.sendall(line)
                reply = s.recv(4096)
                assert reply == b"" or b"too large" in reply
            except (BrokenPipeError, ConnectionResetError):
                pass
    assert status(g)["a"]["pid"] == pid
    assert len(g.history()) == records
    assert psutil.Process(g.pid).memory_info().rss < 300 << 20


def test_a_staged_file_is_recorded_even_when_checking_it_fails(
    gosup_factory: Factory, goapp: Path
) -> None:
    """Every claimed version ends in a record: here the file is unreadable for
    gosup (a directory on the staging path)."""
    g, _ = running_gosup(gosup_factory, goapp)
    staging_of(g).mkdir()
    g.wait_event("config_rejected", "api", where=reason_is("not_a_regular_file"))


def test_stage_resolves_a_relative_live_path_against_the_config(
    tmp_path: Path, goapp: Path
) -> None:
    """Before: LIVE_PATH was taken relative to the current directory (exit 2,
    "not a config_files path") although app.toml's paths are relative to it."""
    app = tmp_path / "app"
    (app / "config").mkdir(parents=True)
    (app / "app.toml").write_text(app_toml(goapp, program="autostart = false"))
    new = tmp_path / "new.conf"
    new.write_bytes(V1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = ["stage", "-c", str(app / "app.toml"), str(new), "config/app.conf"]
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", *argv],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr  # staged; no gosup to confirm it
    assert (app / "config" / "app.conf.new").read_bytes() == V1
    assert "gosup is not running: no verdict" in r.stdout
