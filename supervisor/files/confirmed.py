"""The last confirmed version of each config file, kept under state_dir.

``.prev`` is only the version before the last apply; after two bad deploys
in a row it is bad too. What a crash loop needs is the last version the
program *proved* it runs with (``config_confirmed``), so each confirmation
keeps a copy of that version here:

    <state_dir>/confirmed/<program>/<key>          the content (mode kept)
    <state_dir>/confirmed/<program>/<key>.sha256   "<hex>  <live path>"

``<key>`` is the live file's name plus a hash of its whole path, so two
files of one program with the same name never share a slot. Both files are
written whole and renamed into place (the content first): a gosup killed at
any moment leaves either the previous pair or the new one, and a content
that does not hash to its sidecar is never restored.

Synchronous: callers run ``remember`` in a thread. ``restore`` runs on the
loop on purpose (ConfigSync's before-FATAL hook, see configsync.py), once
per crash loop.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from supervisor import fileops
from supervisor.files import configswap as swap


@dataclass(frozen=True)
class Confirmed:
    """Where one live file's last confirmed version is kept."""

    live: Path
    content: Path

    @classmethod
    def of(cls, state_dir: Path, program: str, live: Path) -> Confirmed:
        key = f"{live.name}-{fileops.sha256_bytes(str(live).encode())[:12]}"
        return cls(live, state_dir / "confirmed" / program / key)

    @property
    def sidecar(self) -> Path:
        return self.content.with_name(self.content.name + ".sha256")

    def sha256(self) -> str | None:
        """The kept version's hash, or None when none is kept (or it is damaged)."""
        sidecar = swap.read_sidecar(self.sidecar)
        if sidecar is None or sidecar.sha256 is None:
            return None
        return sidecar.sha256

    def remember(self, sha: str) -> bool:
        """Keep the live file as the last confirmed version, if it still is ``sha``."""
        directory = self.content.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = directory / f".{self.content.name}.tmp"
        try:
            with open(swap.live_target(self.live), "rb") as src, open(tmp, "wb") as dest:
                actual = fileops.sha256_stream(src, copy_to=dest.write)
                dest.flush()
                os.fsync(dest.fileno())
            if actual != sha:  # replaced meanwhile: that one gets its own verdict
                return False
            shutil.copymode(swap.live_target(self.live), tmp)
            os.replace(tmp, self.content)
            side_tmp = directory / f".{self.sidecar.name}.tmp"
            side_tmp.write_text(f"{sha}  {self.live}\n")
            os.replace(side_tmp, self.sidecar)
            fileops.fsync_dir(directory)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def restore(self) -> str | None:
        """Make the kept version live again (the current one becomes
        ``<live>.failed``); its hash, or None when there is nothing sound to restore."""
        sha = self.sha256()
        if sha is None:
            return None
        try:
            if fileops.sha256_file(self.content) != sha:
                return None
        except FileNotFoundError:
            return None
        swap.restore_copy(self.content, self.live)
        return sha
