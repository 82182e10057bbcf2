"""What gosup does to files in several places (stdlib only): SHA-256 of files
and bytes, the one way gosup hashes content, making renames durable, and
dropping big files without freeing their blocks on the caller's thread.

Every hash gosup records or compares goes through here: the binary of each
start (core/spawn.py, which caches it), staged and live config files
(files/configswap.py), ``gosup stage`` (cli/stage.py, which copies while it
hashes), app.toml (config/appconfig.py), dev mode's save check, the
instance name (service/control.py) and the confirmed copies' keys
(files/confirmed.py).

No OpenSSL in the daemon (issue 18, RSS): ``import hashlib`` maps libcrypto,
3.6 MiB resident for good. Hashes are made in process by CPython's own
SHA-256 (``_sha256``), which is about 5x slower than OpenSSL's and holds
the GIL while it hashes: it is handed ``CHUNK`` bytes at a time (about 1 ms
of hashing each; every read between them lets the loop thread take the
GIL). A file of ``CHILD_MIN`` bytes or more (a Go binary at its first
start, a large live config file: ``sha256_file``, ``sha256_fd``) is hashed
by a short-lived ``python -I -S`` child with hashlib instead, handed the
file gosup opened by its descriptor (the very inode gosup looked at), whose
start (15-30 ms) is repaid by OpenSSL's speed, and which the calling thread
waits for without the GIL; the child dies with gosup (its parent-death
signal). When that child cannot run or says nothing
usable, the file is hashed in process: the digest is the same either way.
(A staged file is read through a bound on its size, ``sha256_stream``: in
process, whatever its size.)

Files are read into one reused buffer: hashing large binaries in worker
threads with a fresh buffer per chunk left ~4 MiB of freed memory in each
thread's arena.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the same interface, and typeshed knows this one
    from concurrent.futures import ThreadPoolExecutor
    from hashlib import sha256 as _new_sha256
else:
    try:
        from _sha256 import sha256 as _new_sha256  # CPython's own: no libcrypto
    except ImportError:  # a Python built without it
        from hashlib import sha256 as _new_sha256

CHUNK = 256 << 10  # bytes handed to the builtin SHA-256 at a time (about 1 ms)
# bytes: a file this large is hashed by a child with OpenSSL. Where the two
# cost the same here: the builtin hashes about 5 ms/MiB, the child costs a
# Python start (15-30 ms) plus about 1 ms/MiB.
CHILD_MIN = 4 << 20
# The child: parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL), then
# hashlib's own file_digest of gosup's descriptor, from where its read stands.
_CHILD_CODE = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1,9,0,0,0)\n"
    "if os.getppid()!=int(sys.argv[1]):sys.exit(1)\n"
    "import hashlib\n"
    "with open(int(sys.argv[2]),'rb',closefd=False) as f:\n"
    " print(hashlib.file_digest(f,'sha256').hexdigest())\n"
)


class Readable(Protocol):
    """A binary file open for reading (``open(path, "rb")``)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of ``data`` (small: a path, app.toml)."""
    return _new_sha256(data).hexdigest()


def sha256_stream(f: Readable, copy_to: Callable[[memoryview], object] | None = None) -> str:
    """The hex SHA-256 of what is left to read in ``f``.

    ``copy_to`` (a file's ``write``) is handed every chunk as it is hashed,
    so a copy costs no second read. The chunk is a view of a buffer that the
    next read overwrites: ``copy_to`` must be done with it when it returns.
    """
    digest = _new_sha256()
    buffer = memoryview(bytearray(CHUNK))
    while size := f.readinto(buffer):
        chunk = buffer[:size]
        digest.update(chunk)
        if copy_to is not None:
            copy_to(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of the file at ``path`` (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        return sha256_fd(f.fileno())


def sha256_fd(fd: int) -> str:
    """The hex SHA-256 of what is left to read of the regular file open at
    ``fd`` (its offset moves): by a child with OpenSSL when that is
    ``CHILD_MIN`` bytes or more, else (or when the child cannot say) in process."""
    start = os.lseek(fd, 0, os.SEEK_CUR)
    if os.fstat(fd).st_size - start >= CHILD_MIN:
        digest = _child_sha256(fd)
        if digest is not None:
            return digest
        os.lseek(fd, start, os.SEEK_SET)
    with open(fd, "rb", buffering=0, closefd=False) as f:
        return sha256_stream(f)


def _child_sha256(fd: int) -> str | None:
    """The hex SHA-256 of the file open at ``fd`` by a ``python -I -S``
    child with hashlib; None when it cannot say (no interpreter, killed,
    unreadable file): the caller hashes in process then."""
    if not sys.executable:
        return None
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _CHILD_CODE, str(os.getpid()), str(fd)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
    except OSError:
        return None
    out, _ = child.communicate()
    digest = out.strip().decode("ascii", "replace")
    if child.returncode != 0 or len(digest) != 64:
        return None
    return digest


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the renames and creations in ``directory`` durable (the staged-file
    swap in files/configswap.py, ``gosup stage`` in cli/stage.py)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- dropping big files ----------------------------------------------------------------
#
# Deleting (or renaming onto) a big file frees its blocks inside the system
# call: 883 ms for a 1 GiB log backup on ext4 mounted with ``discard``, and
# log and history rotations run on the loop (issue 18). The file that goes
# is renamed aside in its directory (metadata only) and unlinked by a
# thread. A hidden name left by a gosup killed in between is deleted when a
# file in that directory is next opened (``sweep_discarded``).

DISCARD_SUFFIX = ".gosup-discard"
_discards = itertools.count(1)
_swept: set[str] = set()
_discarder: ThreadPoolExecutor | None = None
_discarder_lock = threading.Lock()

OnError = Callable[[str], object] | None  # hears "cannot delete ...", from the thread


def discard(path: str | os.PathLike[str], on_error: OnError = None) -> None:
    """Remove ``path`` (if it exists) without freeing its blocks in this thread."""
    directory, name = os.path.split(os.fspath(path))
    aside = os.path.join(directory, f".{name}.{os.getpid()}-{next(_discards)}{DISCARD_SUFFIX}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    _unlink_later(aside, on_error)


def sweep_discarded(directory: str | os.PathLike[str], on_error: OnError = None) -> None:
    """Delete what ``discard`` left in ``directory`` when its gosup was killed:
    once per directory and process, listed and deleted by the thread (a log
    directory of 1,000 programs holds thousands of names)."""
    key = os.fspath(directory)
    if key in _swept:
        return
    _swept.add(key)
    _in_thread(_sweep, key, on_error)


def _sweep(directory: str, on_error: OnError) -> None:
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(".") and name.endswith(DISCARD_SUFFIX):
            _unlink_quietly(os.path.join(directory, name), on_error)


def _unlink_later(path: str, on_error: OnError) -> None:
    _in_thread(_unlink_quietly, path, on_error)


def _in_thread(fn: Callable[[str, OnError], None], path: str, on_error: OnError) -> None:
    global _discarder
    with _discarder_lock:
        if _discarder is None:
            from concurrent.futures import ThreadPoolExecutor  # (not on the CLI's path)

            _discarder = ThreadPoolExecutor(1, thread_name_prefix="gosup-discard")
        _discarder.submit(fn, path, on_error)


def _unlink_quietly(path: str, on_error: OnError) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if on_error is not None:
            on_error(f"cannot delete {path}: {exc.strerror or exc}")
