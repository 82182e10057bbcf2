"""The file side of staged config: verify, swap, roll back (stdlib and ``digest`` only).

Nothing here knows about programs or the event loop: each function takes
paths, does its work synchronously (callers run it in a thread) and returns
or raises. The guarantees live in one place:

* The live file is only ever replaced by rename(2) of a complete, fsynced
  file in the live file's own directory, then the directory is fsynced. A
  reader, or a gosup killed at any instant, sees the old version or the new
  one, never a mix.
* ``<path>.prev`` (the version live before the last apply) and
  ``<path>.failed`` (the version a rollback took back) are made by hard link
  where possible: no copy, the old inode just gets a second name. Where hard
  links are impossible (another filesystem) they are copied, fsynced and
  renamed into place, so they are never torn either.
* A live path that is a symlink stays a symlink: the file it points to,
  resolved at swap time, is what gets replaced.

Running a validator on a claimed file is ``validator.py``'s job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from supervisor import fileops

_SHA256 = re.compile(r"[0-9a-f]{64}")


def sidecar_of(staging: Path) -> Path:
    return staging.with_name(staging.name + ".sha256")


def work_of(staging: Path) -> Path:
    """Where a claimed staged file waits while gosup checks it."""
    return staging.with_name(staging.name + ".applying")


def rejected_of(staging: Path) -> Path:
    return staging.with_name(staging.name + ".rejected")


def prev_of(live: Path) -> Path:
    return live.with_name(live.name + ".prev")


def failed_of(live: Path) -> Path:
    return live.with_name(live.name + ".failed")


# -- hashes and sidecars ----------------------------------------------------------


def sha256_regular(path: Path) -> str | None:
    """The hash of a regular file at ``path``; None for anything else. A staged
    symlink would make the live file a link to wherever it points (and the
    install's chmod would follow it); a FIFO would block the read for good."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink
            return None
        raise
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fileops.sha256_stream(f)


def sha256_or_none(path: Path) -> str | None:
    """The file's hash, or None when it does not exist (yet)."""
    try:
        return fileops.sha256_file(path)
    except (FileNotFoundError, IsADirectoryError):
        return None


@dataclass(frozen=True)
class Sidecar:
    text: str  # the whole content, to recognise this very sidecar when consuming it
    sha256: str | None  # None: the file holds no SHA-256


def parse_sidecar(text: str) -> str | None:
    """The hash in what ``sha256sum`` writes: "<hex>  <name>", "<hex> *<name>", or "<hex>".

    The name is not checked: the sidecar usually names the file as the
    deployer knew it, not the staging path.
    """
    words = text.split(maxsplit=1)
    if not words:
        return None
    # sha256sum prefixes the line with a backslash when the name had to be escaped.
    first = words[0].removeprefix("\\").lower()
    return first if _SHA256.fullmatch(first) else None


def read_sidecar(path: Path) -> Sidecar | None:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    return Sidecar(text, parse_sidecar(text))


def _grabbed_of(sidecar: Path) -> Path:
    return sidecar.with_name(sidecar.name + ".consumed")


def consume_sidecar(path: Path, text: str) -> None:
    """Remove the sidecar if it still says ``text``.

    A deployer may already have written the next version's sidecar (it is
    written before that file is renamed onto the staging path); that one is
    put back for its own file. Grabbing by rename makes this race-free: the
    sidecar we look at can no longer change under us.
    """
    grabbed = _grabbed_of(path)
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:
        return
    try:
        if grabbed.read_text(errors="replace") != text:
            # A newer sidecar: back it goes, unless an even newer one arrived meanwhile.
            with contextlib.suppress(FileExistsError):
                os.link(grabbed, path)
    finally:
        grabbed.unlink(missing_ok=True)


# -- claiming and setting aside -------------------------------------------------------


def claim(staging: Path) -> Path | None:
    """Take the staged file away from the staging path, or None if nothing is staged.

    From here on a newer version can land on the staging path without
    touching the one being checked.
    """
    work = work_of(staging)
    try:
        os.rename(staging, work)
    except FileNotFoundError:
        return None
    return work


def recover(staging: Path) -> bool:
    """After a gosup that died while checking a file: stage that file again.

    A newer staged version wins over it. Returns whether one was put back.
    A sidecar it died holding goes back too (it only vouches for the content
    it names, so putting it back can never let a different file through).
    """
    sidecar = sidecar_of(staging)
    grabbed = _grabbed_of(sidecar)
    if grabbed.exists():
        if sidecar.exists():
            grabbed.unlink()
        else:
            os.rename(grabbed, sidecar)
    work = work_of(staging)
    if not work.exists():
        return False
    if staging.exists():
        work.unlink()
        return False
    os.rename(work, staging)
    return True


def set_aside(work: Path, dest: Path) -> None:
    os.replace(work, dest)
    fileops.fsync_dir(dest.parent)


# -- the swap -------------------------------------------------------------------------


def live_target(live: Path) -> Path:
    """The file that really gets replaced: a symlink's final target, else the path."""
    return Path(os.path.realpath(live)) if live.is_symlink() else live


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.gosup-tmp")
    tmp.unlink(missing_ok=True)  # left by a gosup that died here
    return tmp


def _copy_into_place(src: Path, dest: Path) -> None:
    """Give ``dest`` the content of ``src``: a whole file renamed into place."""
    tmp = _temp_beside(dest)
    shutil.copyfile(src, tmp)
    shutil.copymode(src, tmp)
    _fsync_file(tmp)
    os.replace(tmp, dest)


def _link_into_place(src: Path, dest: Path) -> None:
    """Make ``dest`` another name of ``src`` (copy where hard links are impossible)."""
    tmp = _temp_beside(dest)
    try:
        os.link(src, tmp)
    except OSError:
        _copy_into_place(src, dest)
        return
    os.replace(tmp, dest)


def _keep_owner_and_mode(old: Path, new: Path) -> None:
    """The new version gets the live file's mode (and owner, when we may set it)."""
    st = old.stat()
    os.chmod(new, st.st_mode & 0o7777)
    if os.geteuid() == 0:
        os.chown(new, st.st_uid, st.st_gid)


def install(work: Path, live: Path) -> None:
    """Make ``work`` the live file; the previous live version becomes ``<live>.prev``."""
    target = live_target(live)
    prev = prev_of(live)
    if target.exists():
        _link_into_place(target, prev)
        _keep_owner_and_mode(target, work)
    _fsync_file(work)  # the deployer may not have: the data must be on disk before the rename
    try:
        os.replace(work, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_into_place(work, target)  # staging on another filesystem
        work.unlink()
    for directory in {target.parent, prev.parent, work.parent}:
        fileops.fsync_dir(directory)


def restore(live: Path) -> None:
    """Roll back: ``<live>.prev`` becomes live again, the current one ``<live>.failed``."""
    target = live_target(live)
    prev = prev_of(live)
    if not prev.exists():
        raise FileNotFoundError(errno.ENOENT, "no previous version to restore", str(prev))
    failed = failed_of(live)
    if target.exists():
        _link_into_place(target, failed)
    _link_into_place(prev, target)
    for directory in {target.parent, prev.parent}:
        fileops.fsync_dir(directory)
