"""What gosup does to files in several places (stdlib only): SHA-256 of files
and bytes, the one way gosup hashes content, and making renames durable.

Every hash gosup records or compares goes through here: the binary of each
start (core/spawn.py, which caches it), staged and live config files
(files/configswap.py), ``gosup stage`` (cli/stage.py, which copies while it
hashes), app.toml (config/appconfig.py) and dev mode's save check.

Files are read into one reused 1 MiB buffer: hashing large binaries in
worker threads with a fresh buffer per chunk left ~4 MiB of freed memory in
each thread's arena.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Protocol

CHUNK = 1 << 20


class Readable(Protocol):
    """A binary file open for reading (``open(path, "rb")``)."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def sha256_bytes(data: bytes) -> str:
    """The hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(f: Readable, copy_to: Callable[[memoryview], object] | None = None) -> str:
    """The hex SHA-256 of what is left to read in ``f``.

    ``copy_to`` (a file's ``write``) is handed every chunk as it is hashed,
    so a copy costs no second read. The chunk is a view of a buffer that the
    next read overwrites: ``copy_to`` must be done with it when it returns.
    """
    digest = hashlib.sha256()
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
        return sha256_stream(f)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the renames and creations in ``directory`` durable (the staged-file
    swap in files/configswap.py, ``gosup stage`` in cli/stage.py)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
