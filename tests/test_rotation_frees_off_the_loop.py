"""A log rotation never frees a file's blocks on the caller's thread (the loop).

Replacing or deleting a log backup of 1 GiB frees its blocks inside the
``rename``/``unlink`` itself: 883 ms on this machine's ext4 (mounted with
``discard``), and that was the loop standing still (issue 18, "Loop lag
under stress": the flood program's log rotates at 1 GiB). The backup that
goes is renamed aside (metadata only) and deleted by a thread."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import wait_for

from supervisor import fileops
from supervisor.core.output import RotatingFile
from supervisor.history import History


def _watch(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """(operation, thread, bytes it freed) for every replace/rename/unlink."""
    seen: list[tuple[str, str, int]] = []
    real_replace, real_unlink = os.replace, os.unlink

    def size(path: object) -> int:
        try:
            st = os.lstat(path)  # type: ignore[arg-type]
        except OSError:
            return 0
        return st.st_size if st.st_nlink == 1 else 0

    def replace(src: object, dst: object, **kw: object) -> None:
        seen.append(("replace", threading.current_thread().name, size(dst)))
        real_replace(src, dst, **kw)  # type: ignore[arg-type]

    def unlink(path: object, **kw: object) -> None:
        seen.append(("unlink", threading.current_thread().name, size(path)))
        real_unlink(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    return seen


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_rotation_frees_nothing_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backups: int
) -> None:
    log = RotatingFile(tmp_path / "app.stdout.log", max_size=1000, backups=backups)
    log.open()
    seen = _watch(monkeypatch)
    for i in range(8):  # 8 files' worth: every backup is pushed out more than once
        log.write(f"{i}".encode() * 999 + b"\n")
    log.close()
    me = threading.current_thread().name
    freed_here = [op for op in seen if op[1] == me and op[2] > 0]
    assert freed_here == []
    # What went is gone, from the thread: no hidden file is left behind.
    wait_for(
        lambda: (
            sorted(p.name for p in tmp_path.iterdir())
            == sorted(["app.stdout.log"] + [f"app.stdout.log.{n}" for n in range(1, backups + 1)])
        ),
        10,
        "the discarded backups to be deleted",
    )
    assert (tmp_path / "app.stdout.log").read_bytes() == b"7" * 999 + b"\n"
    for n in range(1, backups + 1):
        assert (tmp_path / f"app.stdout.log.{n}").read_bytes() == str(7 - n).encode() * 999 + b"\n"
    assert any(op[1] != me and op[2] > 0 for op in seen)  # the thread did delete them


def _open_log(directory: Path) -> None:
    log = RotatingFile(directory / "app.stdout.log", max_size=1000, backups=1)
    log.open()
    log.close()  # a RotatingFile holds a bare fd: dropping it closes nothing


def _open_history(directory: Path) -> None:
    History(directory / "history.jsonl").close()


@pytest.mark.parametrize(
    ("left_name", "open_file"),
    [
        (".app.stdout.log.17.gosup-discard", _open_log),
        (".history.jsonl.5.1234-1.gosup-discard", _open_history),
    ],
)
def test_what_a_killed_gosup_left_to_delete_is_deleted_at_the_next_open(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    left_name: str,
    open_file: Callable[[Path], None],
) -> None:
    left = tmp_path / left_name
    left.write_bytes(b"x" * 4096)
    fileops._swept.discard(str(tmp_path))
    listed: list[str] = []
    real_listdir = os.listdir

    def listdir(path: object = ".") -> list[str]:
        listed.append(threading.current_thread().name)
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    open_file(tmp_path)
    wait_for(lambda: not left.exists(), 10, "the leftover to be deleted")
    # Listed by the thread too: a log directory may hold thousands of names.
    assert listed and threading.current_thread().name not in listed


# The history rotates the same way (history_max_size, 64 MiB by default:
# dropping its oldest backup froze the loop too).


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_a_history_rotation_frees_nothing_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backups: int
) -> None:
    path = tmp_path / "history.jsonl"
    history = History(path, max_size=1000, backups=backups)
    # A backup beyond history_backups (it was larger before): dropped too.
    (tmp_path / f"history.jsonl.{backups + 1}").write_bytes(b"{}\n" * 100)
    seen = _watch(monkeypatch)
    for i in range(40):  # about 8 files' worth
        history.record("started", program="p", n=i, pad="x" * 150)
    history.close()
    me = threading.current_thread().name
    assert [op for op in seen if op[1] == me and op[2] > 0] == []
    kept = ["history.jsonl"] + [f"history.jsonl.{n}" for n in range(1, backups + 1)]
    wait_for(
        lambda: sorted(p.name for p in tmp_path.iterdir()) == sorted(kept),
        10,
        "the dropped history files to be deleted",
    )
    # Newest last in the live file, then .1, .2 ... each older than the one before.
    ns = [
        [json.loads(line)["n"] for line in (tmp_path / name).read_text().splitlines()]
        for name in kept
    ]
    assert ns[0][-1] == 39
    assert all(older[-1] < newer[0] for newer, older in itertools.pairwise(ns))
    assert any(op[1] != me and op[2] > 0 for op in seen)  # the thread did delete them
