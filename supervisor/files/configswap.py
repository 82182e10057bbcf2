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
* What a deployer hands over is opened without following a link and without
  blocking (``O_NOFOLLOW | O_NONBLOCK``), and used only when it is a regular
  file with one name, of a bounded size (``open_regular``): the staging
  directory may belong to a less trusted user than gosup, so a FIFO, a link
  to ``/dev/zero`` or ``/etc/shadow``, or a hard link to someone else's file
  is refused (``Refused``) before gosup reads, hashes, chmods or chowns it.
  Mode and owner are changed through the descriptor checked, never by path.

Running a validator on a claimed file is ``validator.py``'s job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor import fileops

_SHA256 = re.compile(r"[0-9a-f]{64}")
SIDECAR_MAX = 1024  # bytes: a hash, two spaces and a file name, as sha256sum writes them
STAGED_MAX = 1 << 30  # bytes: config files, and Go binaries deployed the same way
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
Identity = tuple[int, int]  # (st_dev, st_ino): the very file that was checked


class Refused(Exception):
    """A staged file or sidecar gosup will not use: ``reason`` is the history's
    (``not_a_regular_file``, ``too_large``, ``unreadable``), ``error`` says why."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error


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


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISLNK, "symbolic link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO")]
    kinds += [(stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device")]
    return next((name for test, name in kinds if test(mode)), "special file")


def open_regular(
    path: Path, limit: int, what: str, one_name: bool = False
) -> tuple[int, os.stat_result]:
    """An open descriptor of the regular file at ``path`` and its stat, or Refused.

    Never follows a link, never blocks on a FIFO, never opens a device (the
    lstat refuses it before the open; the fstat after it catches a swap in
    between). ``one_name``: a hard link is refused too, for a file whose mode
    and owner the install changes (it may be another user's file).
    FileNotFoundError passes through.
    """
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not_a_regular_file", f"{what} is a {_kind(st.st_mode)}")
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a symlink after the lstat
            raise Refused("not_a_regular_file", f"{what} is a symbolic link") from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise Refused("unreadable", f"{what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("not_a_regular_file", f"{what} is a {_kind(st.st_mode)}")
        if one_name and st.st_nlink != 1:
            raise Refused("not_a_regular_file", f"{what} is a hard link ({st.st_nlink} names)")
        if st.st_size > limit:
            raise Refused("too_large", f"{what} is {st.st_size} bytes, more than {limit}")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


class _Bounded:
    """A file read through ``readinto`` that refuses to give more than ``limit``
    bytes (a deployer may keep appending after the size was checked)."""

    def __init__(self, fd: int, limit: int, what: str) -> None:
        self.fd, self.left, self.limit, self.what = fd, limit + 1, limit, what

    def readinto(self, buffer: memoryview, /) -> int:
        size = os.readv(self.fd, [buffer[: min(len(buffer), self.left)]])
        self.left -= size
        if self.left <= 0:
            raise Refused("too_large", f"{self.what} grew past {self.limit} bytes")
        return size


@dataclass(frozen=True)
class Staged:
    sha256: str
    identity: Identity


def inspect_staged(work: Path) -> Staged:
    """The claimed staged file's hash and identity, or Refused."""
    fd, st = open_regular(work, STAGED_MAX, "the staged file", one_name=True)
    try:
        sha = fileops.sha256_stream(_Bounded(fd, STAGED_MAX, "the staged file"))
    except OSError as exc:
        raise Refused("unreadable", f"the staged file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return Staged(sha, (st.st_dev, st.st_ino))


def sha256_or_none(path: Path) -> str | None:
    """The hash of the (live) file at ``path``, following links; None when it does
    not exist (yet) or is not a regular file (a FIFO put there must not block us)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fileops.sha256_fd(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Sidecar:
    # The whole content, to recognise this very sidecar when consuming it;
    # None for one that was refused (not a regular file, too large ...).
    text: str | None
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


def _read_small(path: Path, what: str) -> str:
    """The text of a regular file of at most SIDECAR_MAX bytes, or Refused."""
    fd, _ = open_regular(path, SIDECAR_MAX, what)
    try:
        data = os.read(fd, SIDECAR_MAX + 1)
    except OSError as exc:
        raise Refused("unreadable", f"{what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > SIDECAR_MAX:
        raise Refused("too_large", f"{what} grew past {SIDECAR_MAX} bytes")
    return data.decode(errors="replace")


def read_sidecar(path: Path) -> Sidecar | None:
    """The sidecar at ``path``, None when there is none; Refused when it is not a
    regular file of at most SIDECAR_MAX bytes."""
    try:
        text = _read_small(path, "the sidecar")
    except FileNotFoundError:
        return None
    return Sidecar(text, parse_sidecar(text))


def _grabbed_of(sidecar: Path) -> Path:
    return sidecar.with_name(sidecar.name + ".consumed")


def consume_sidecar(path: Path, text: str | None) -> None:
    """Remove the sidecar if it still says ``text`` (``None``: if it is still
    one that was refused).

    A deployer may already have written the next version's sidecar (it is
    written before that file is renamed onto the staging path); that one is
    put back for its own file. Grabbing by rename makes this race-free: the
    sidecar we look at can no longer change under us. A directory is left
    where it is: removing a tree someone else made is not gosup's business.
    """
    if os.path.isdir(path) and not os.path.islink(path):
        return
    grabbed = _grabbed_of(path)
    try:
        os.rename(path, grabbed)
    except FileNotFoundError:
        return
    try:
        try:
            same = _read_small(grabbed, "the sidecar") == text
        except Refused:
            same = text is None
        if not same:
            # A newer sidecar: back it goes, unless an even newer one arrived meanwhile.
            with contextlib.suppress(FileExistsError):
                os.link(grabbed, path, follow_symlinks=False)
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
    if os.path.lexists(grabbed):  # lexists: a refused symlink counts too
        if os.path.lexists(sidecar):
            grabbed.unlink()
        else:
            os.rename(grabbed, sidecar)
    work = work_of(staging)
    if not os.path.lexists(work):
        return False
    if os.path.lexists(staging):
        if work.is_dir() and not work.is_symlink():
            return False  # a directory someone put there: left for its owner
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


def _temp_beside(dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.gosup-tmp")
    tmp.unlink(missing_ok=True)  # left by a gosup that died here
    return tmp


def _copy_into_place(src: Path, dest: Path) -> None:
    """Give ``dest`` the content of ``src``: a whole file renamed into place.

    The copy is made 0600 and gets ``src``'s mode only once it is complete: a
    config may hold secrets, and nobody must get a descriptor to it meanwhile.
    """
    tmp = _temp_beside(dest)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(src, "rb") as fin, open(os.open(tmp, flags, 0o600), "wb") as fout:
        shutil.copyfileobj(fin, fout, fileops.CHUNK)
        fout.flush()
        os.fchmod(fout.fileno(), stat.S_IMODE(os.fstat(fin.fileno()).st_mode))
        os.fsync(fout.fileno())
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
    # When dest already was a name of that inode (after a rollback, .prev and
    # the live file are), rename(2) does nothing at all and tmp stays.
    tmp.unlink(missing_ok=True)


def _first_mode(mode: int) -> int:
    """The mode of a file that had no live version to take it from: the
    deployer's, without set-id bits and without write access for others."""
    return stat.S_IMODE(mode) & 0o775


def _prepare(work: Path, target: Path, identity: Identity | None) -> None:
    """Give the claimed file its final mode and owner and make it durable,
    through a descriptor of the very file that was checked (Refused if the
    name now holds another one: the staging directory is the deployer's)."""
    fd, st = open_regular(work, STAGED_MAX, "the staged file", one_name=True)
    try:
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise Refused("not_a_regular_file", "the staged file was replaced while checked")
        try:
            old = os.stat(target)
        except FileNotFoundError:
            os.fchmod(fd, _first_mode(st.st_mode))
        else:  # the live file's mode (and owner, when we may set it)
            os.fchmod(fd, old.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(fd, old.st_uid, old.st_gid)
        os.fsync(fd)  # the deployer may not have: the data must be on disk before the rename
    finally:
        os.close(fd)


def install(work: Path, live: Path, identity: Identity | None = None) -> None:
    """Make ``work`` the live file; the previous live version becomes ``<live>.prev``.

    ``identity`` is the (st_dev, st_ino) ``inspect_staged`` saw: the file at
    ``work`` must still be that one. Refused when it is not, or no longer a
    regular file with one name.
    """
    target = live_target(live)
    prev = prev_of(live)
    _prepare(work, target, identity)
    if target.exists():
        _link_into_place(target, prev)
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
    prev = prev_of(live)
    if not prev.exists():
        raise FileNotFoundError(errno.ENOENT, "no previous version to restore", str(prev))
    _put_back(prev, live, _link_into_place)


def restore_copy(kept: Path, live: Path) -> None:
    """Like ``restore``, from a copy kept elsewhere (``confirmed``): copied, so that
    the kept one stays intact whatever is later done to the live file."""
    _put_back(kept, live, _copy_into_place)


def _put_back(source: Path, live: Path, place: Callable[[Path, Path], None]) -> None:
    target = live_target(live)
    failed = failed_of(live)
    if target.exists():
        _link_into_place(target, failed)
    place(source, target)
    for directory in {target.parent, failed.parent}:
        fileops.fsync_dir(directory)
