"""An idle gosup loads neither OpenSSL's libcrypto (``hashlib``) nor psutil,
nor the compression modules shutil imports for its archives (issue 18,
RSS), and its hashes are still SHA-256 as hashlib makes them.

fileops hashes with CPython's builtin ``_sha256`` in process, and a file of
``CHILD_MIN`` bytes or more (a Go binary at its first start) in a short-lived
``python -I -S`` child with hashlib; psutil is imported only where a
leftover, an orphan or a stop's tree is looked at, and pids.json's start
times come from /proc. Real gosup, real Go children; every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import Gosup, wait_for

from supervisor import fileops
from supervisor.files import configswap as swap
from supervisor.service import orphans


def _program(goapp: Path, name: str) -> str:
    argv = json.dumps([str(goapp), "-name", name])
    return f'[programs.{name}]\ncommand = {argv}\nstart_seconds = "100ms"\n'


def _imported(g: Gosup) -> set[str]:
    """Modules gosup imported (PYTHONPROFILEIMPORTTIME's lines on its stderr)."""
    return {
        line.split("|")[-1].strip()
        for line in g.log().splitlines()
        if line.startswith("import time:")
    }


def test_idle_daemon_loads_no_libcrypto_psutil_or_archives(gosup_factory: Any, goapp: Path) -> None:
    names = ("a", "b", "c")
    g = gosup_factory("".join(_program(goapp, n) + "\n" for n in names))
    g.start({"PYTHONPROFILEIMPORTTIME": "1"})
    pids = {n: g.running_pid(n) for n in names}
    assert g.cli("status").returncode == 0

    # pids.json is written (with each child's start time, read from /proc) ...
    def recorded() -> dict[str, Any] | None:
        path = g.state_dir / orphans.PIDS_FILE
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if set(data["programs"]) == set(names) else None

    data = wait_for(recorded, 15, "pids.json with every program")
    # ... and says what psutil says, so the records of either compare.
    for name, pid in pids.items():
        rec = data["programs"][name]
        assert rec["pid"] == pid
        assert abs(rec["create_time"] - psutil.Process(pid).create_time()) < 1e-6
    me = data["supervisor"]
    assert abs(me["create_time"] - psutil.Process(g.pid).create_time()) < 1e-6

    maps = Path(f"/proc/{g.pid}/maps").read_text()
    assert "libcrypto" not in maps, "OpenSSL's libcrypto is mapped in an idle daemon"
    lazy = _imported(g) & {"hashlib", "_hashlib", "psutil"}
    assert not lazy, f"imported by an idle daemon: {sorted(lazy)}"
    # (importtime also logs shutil's attempts that were turned away: the maps say.)
    for lib in ("libz.", "zlib.cpython", "libbz2", "_bz2.", "liblzma", "_lzma."):
        assert lib not in maps, f"{lib} mapped in an idle daemon"

    # Every start recorded its binary's hash (the Go binary is hashed by the
    # OpenSSL child: it is over CHILD_MIN), identical to hashlib's.
    assert goapp.stat().st_size >= fileops.CHILD_MIN
    expected = hashlib.sha256(goapp.read_bytes()).hexdigest()
    for name in names:
        started = g.history(name, "started")
        assert started and started[-1]["binary_sha256"] == expected


@pytest.mark.parametrize(
    "size",
    [0, 1, 55, 64, fileops.CHUNK - 1, fileops.CHUNK, 3 * fileops.CHUNK + 7,
     fileops.CHILD_MIN - 1, fileops.CHILD_MIN, 2 * fileops.CHILD_MIN + 3],
)  # fmt: skip
def test_digests_are_hashlibs(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    expected = hashlib.sha256(data).hexdigest()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fileops.sha256_bytes(data) == expected
    assert fileops.sha256_file(path) == expected
    copied = io.BytesIO()
    with open(path, "rb") as f:
        assert fileops.sha256_stream(f, copy_to=copied.write) == expected
    assert copied.getvalue() == data
    assert swap.sha256_or_none(path) == expected  # a live config file's hash
    # From where the descriptor's offset stands (to EOF, which it then is at).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, min(3, size), os.SEEK_SET)
        assert fileops.sha256_fd(fd) == hashlib.sha256(data[3:]).hexdigest()
        assert os.lseek(fd, 0, os.SEEK_CUR) == size
    finally:
        os.close(fd)


def test_large_files_go_to_the_child_and_fall_back_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(fileops.CHILD_MIN + 5)
    expected = hashlib.sha256(data).hexdigest()
    path = tmp_path / "big"
    path.write_bytes(data)
    with open(path, "rb") as f:
        assert fileops._child_sha256(f.fileno()) == expected  # the child itself
    fd = os.open(path, os.O_RDONLY)
    try:  # it reads from the offset gosup's descriptor stands at
        os.lseek(fd, 5, os.SEEK_SET)
        assert fileops._child_sha256(fd) == hashlib.sha256(data[5:]).hexdigest()
    finally:
        os.close(fd)
    # No interpreter to start, or one that fails: hashed in process, from the start.
    monkeypatch.setattr(sys, "executable", "")
    assert fileops.sha256_file(path) == expected
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    assert fileops.sha256_file(path) == expected
    monkeypatch.setattr(sys, "executable", "/bin/false")
    assert fileops.sha256_file(path) == expected


def test_shutil_without_archives_leaves_them_importable() -> None:
    code = (
        "import sys\n"
        "from supervisor import gosup\n"
        "gosup._import_shutil_without_archives()\n"
        "import shutil\n"
        "assert not {'zlib', 'bz2', 'lzma'} & set(sys.modules), sorted(sys.modules)\n"
        "assert shutil.which('sh')\n"
        "import bz2, lzma, zlib\n"
        "assert bz2.decompress(bz2.compress(b'x')) == b'x'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def _maps_hold(pid: int, text: str) -> bool:
    try:
        return text in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_the_hashing_child_dies_with_its_parent() -> None:
    # The child hashes a pipe whose writer (this test) stays open: it waits
    # for ever, until its parent is SIGKILLed and the kernel kills it too.
    code = (
        "import sys\n"
        "from supervisor import fileops\n"
        "print('ready', flush=True)\n"
        "fileops._child_sha256(int(sys.argv[1]))\n"
    )
    r, w = os.pipe()
    parent = subprocess.Popen(
        [sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, text=True, pass_fds=(r,)
    )
    os.close(r)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        kids = wait_for(lambda: _children(parent.pid), 15, "the hashing child")
        # Past its set-up (hashlib's libcrypto is loaded just before it reads).
        wait_for(lambda: all(_maps_hold(k, "libcrypto") for k in kids), 15, "the child hashing")
        parent.kill()
        parent.wait(15)

        def gone() -> bool:
            for pid in kids:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                            return False
                except OSError:
                    pass
            return True

        wait_for(gone, 15, "the hashing child gone with its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
        os.close(w)
