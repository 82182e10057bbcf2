"""``gosup stage NEW_FILE LIVE_PATH``: hand a new config version to gosup.

The staging protocol (docs/config-files.md, "Deploying a new version"),
which this command follows and which any deployer may follow by hand: copy
the new version to a temporary name in the staging directory, write
``<staging>.sha256`` ("<hex>  <name>", as ``sha256sum`` writes it), then
rename the copy onto ``<staging>``. The rename is atomic (same directory),
so gosup never sees half a file, and the sidecar is already there when the
file lands.

Then, when a gosup is running, the command reads the history for a few
seconds (``supervisor.history.read_from``) to tell whether the version was
applied or refused. Stdlib only: it is a client command.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor import fileops, history
from supervisor.cli import common as cli
from supervisor.protocol import HISTORY_NAME, SOCKET_NAME

POLL = 0.02  # seconds between looks at the history while waiting


@dataclass(frozen=True)
class Target:
    live: Path
    staging: Path
    state_dir: Path | None  # None: no gosup config known, so nothing to watch


# -- the protocol --------------------------------------------------------------------


def _copy_hashing(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` (fsynced, with ``src``'s mode) and return its SHA-256.

    ``dest`` is made 0600 and gets the mode once it is whole: nobody can open
    it meanwhile, and a binary keeps its execute bits (gosup gives it the live
    file's mode when it installs it, this one when there is no live file yet).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(src, "rb") as fin, open(os.open(dest, flags, 0o600), "wb") as fout:
        sha = fileops.sha256_stream(fin, copy_to=fout.write)
        fout.flush()
        os.fchmod(fout.fileno(), stat.S_IMODE(os.fstat(fin.fileno()).st_mode) & 0o777)
        os.fsync(fout.fileno())
    return sha


def stage_file(new_file: Path, staging: Path) -> str:
    """Stage ``new_file`` at ``staging``: sidecar first, then the file by rename.

    Returns the version's SHA-256. Temporary names are private to this
    process, so concurrent stagers never write into each other's files.
    """
    directory = staging.parent
    tmp_file = directory / f".{staging.name}.stage-{os.getpid()}"
    tmp_sidecar = directory / f".{staging.name}.sha256.stage-{os.getpid()}"
    try:
        sha = _copy_hashing(new_file, tmp_file)
        tmp_sidecar.write_text(f"{sha}  {new_file.name}\n")
        os.replace(tmp_sidecar, directory / f"{staging.name}.sha256")
        os.replace(tmp_file, staging)
    finally:
        tmp_file.unlink(missing_ok=True)
        tmp_sidecar.unlink(missing_ok=True)
    fileops.fsync_dir(directory)
    return sha


# -- finding the gosup ------------------------------------------------------------------


def find_target(live_arg: str, config_arg: str | None) -> Target:
    """The staging path for LIVE_PATH, from the gosup config's ``config_files``.

    A relative LIVE_PATH is relative to the config file's directory, as every
    path in the config is (without a config: to the current directory).
    """
    path = Path(config_arg or cli.DEFAULT_CONFIG)
    if not path.exists():
        if config_arg is not None:
            raise cli.CLIError(f"{path}: no such config file", cli.EXIT_USAGE)
        # No config here: the protocol still works, with the default staging path.
        live = Path(os.path.abspath(live_arg))
        return Target(live, Path(f"{live}.new"), None)
    live = Path(os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(path)), live_arg)))
    config = cli.load_config(str(path))
    known: list[str] = []
    for program in config.programs:
        for spec in program.config_files:
            known.append(str(spec.path))
            if _same_file(spec.path, live):
                if spec.staging is None:
                    raise cli.CLIError(
                        f"{spec.path} has staging = false in {path}: gosup watches the live "
                        "file itself, so write it in place instead",
                        cli.EXIT_USAGE,
                    )
                return Target(spec.path, spec.staging, config.supervisor.state_dir)
    listed = ", ".join(known) if known else "none"
    raise cli.CLIError(
        f"{live} is not a config_files path in {path} (known: {listed})", cli.EXIT_USAGE
    )


def _same_file(configured: Path, given: Path) -> bool:
    if configured == given:
        return True
    return os.path.realpath(configured) == os.path.realpath(given)


def gosup_running(state_dir: Path) -> bool:
    """Whether a gosup answers on the state directory's control socket.

    Without a socket file (a gosup built without the control socket) the
    history tells: the last supervisor record is a start, not a stop.
    """
    sock_path = state_dir / SOCKET_NAME
    if sock_path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(sock_path))
            except OSError:
                return False
            return True
    last = None
    for rec in history.read_from(state_dir / HISTORY_NAME, 0)[0]:
        if str(rec.get("event", "")).startswith("supervisor_"):
            last = rec["event"]
    return last in ("supervisor_started", "supervisor_reloaded")


# -- waiting for the outcome ----------------------------------------------------------------


def _outcome(rec: dict[str, Any], target: Target, sha: str) -> bool:
    if rec.get("path") != str(target.live):
        return False
    if rec.get("event") == "config_applied":
        return rec.get("sha256") == sha
    return rec.get("event") == "config_rejected" and rec.get("actual") == sha


def wait_outcome(
    path: Path, target: Target, sha: str, offset: int, seconds: float
) -> dict[str, Any] | None:
    """The config_applied / config_rejected record of this version, if one comes in time."""
    deadline = time.monotonic() + seconds
    while True:
        recs, offset = history.read_from(path, offset)
        for rec in recs:
            if _outcome(rec, target, sha):
                return rec
        if time.monotonic() >= deadline:
            return None
        time.sleep(POLL)


def describe_rejection(rec: dict[str, Any]) -> str:
    """What to tell the deployer; the validator's words and errors escaped."""
    lines = [f"rejected: {cli.escape(rec.get('reason'))}"]
    if rec.get("error"):
        lines.append(f"  {cli.escape(rec['error'])}")
    if rec.get("reason") == "checksum_mismatch":
        lines.append(f"  expected sha256 {cli.escape(rec.get('expected'))}")
        lines.append(f"  actual   sha256 {cli.escape(rec.get('actual'))}")
    tail = str(rec.get("output_tail") or "").strip()
    if tail:
        lines.append("  validator said:")
        lines += [f"    {cli.escape(line)}" for line in tail.splitlines()[-10:]]
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------


def cmd_stage(args: argparse.Namespace) -> int:
    new_file = Path(args.new_file)
    if not new_file.is_file():
        raise cli.CLIError(f"{new_file}: not a readable file", cli.EXIT_USAGE)
    if args.wait < 0:
        raise cli.CLIError("--wait must be >= 0", cli.EXIT_USAGE)
    target = find_target(args.live_path, args.config)
    if not target.staging.parent.is_dir():
        raise cli.CLIError(f"{target.staging.parent}: no such directory", cli.EXIT_USAGE)
    history_file = target.state_dir / HISTORY_NAME if target.state_dir else None
    # The offset is taken before staging: no outcome can be missed.
    offset = _size(history_file) if history_file else 0
    try:
        sha = stage_file(new_file, target.staging)
    except OSError as exc:
        raise cli.CLIError(f"cannot stage {new_file} at {target.staging}: {exc}") from None
    if target.state_dir is None or history_file is None:
        print(cli.escape(f"staged at {target.staging} (sha256 {sha}); no gosup config to follow"))
        return cli.EXIT_OK
    if not gosup_running(target.state_dir):
        print(f"staged (sha256 {sha}); gosup is not running: it applies the file at start")
        return cli.EXIT_OK
    rec = wait_outcome(history_file, target, sha, offset, args.wait)
    if rec is None:
        print(f"staged; no gosup applied it within {args.wait:g}s (queued)")
        return cli.EXIT_OK
    if rec["event"] == "config_applied":
        print(f"applied (sha256 {sha})")
        return cli.EXIT_OK
    print(describe_rejection(rec))
    return cli.EXIT_FAILED


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
