"""``gosup stage NEW_FILE LIVE_PATH``: hand a new config version to gosup.

The staging protocol (docs/config-files.md, "Deploying a new version"),
which this command follows and which any deployer may follow by hand: copy
the new version to a temporary name in the staging directory, write
``<staging>.sha256`` ("<hex>  <name>", as ``sha256sum`` writes it), then
rename the copy onto ``<staging>``. The rename is atomic (same directory),
so gosup never sees half a file, and the sidecar is already there when the
file lands.

Then, when a gosup is running, the command follows the history
(``supervisor.history.Tail``, from where it ended before the file was
staged, across a rotation) until the version's verdict: confirmed
(exit 0), or rejected, rolled back, superseded or no verdict in time (exit
1, with the reason). ``--wait`` bounds that; by default it is the file's
probation plus the time the program may take to reload or restart
(``verdict_budget``). ``--no-wait`` only queues the file. Stdlib only: it is
a client command.
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
from supervisor.config import ConfigFileSpec, OnChange, ProgramSpec, parse_duration
from supervisor.protocol import HISTORY_NAME, RELOAD_COMMAND_TIMEOUT, SOCKET_NAME

POLL = 0.02  # seconds between looks at the history while waiting
WAIT_MARGIN = 10.0  # beyond the program's own budgets, how long --wait's default allows


@dataclass(frozen=True)
class Target:
    live: Path
    staging: Path
    state_dir: Path | None  # None: no gosup config known, so nothing to watch
    program: ProgramSpec | None = None
    file: ConfigFileSpec | None = None


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
                state_dir = config.supervisor.state_dir
                return Target(spec.path, spec.staging, state_dir, program, spec)
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
    with history.Last(state_dir / HISTORY_NAME, 1, event_prefix="supervisor_") as last:
        found = [rec.get("event") for rec in last]
    return bool(found) and found[-1] in ("supervisor_started", "supervisor_reloaded")


# -- waiting for the verdict ----------------------------------------------------------------


def verdict_budget(program: ProgramSpec, file: ConfigFileSpec) -> float:
    """How long a verdict may take: validation, the reload or restart, the
    start (readiness), probation, the final checks, and a margin."""
    if program.ready is not None:
        start = program.ready.within + program.ready.timeout
    else:
        start = program.start_seconds
    tell = 0.0
    if file.on_change is OnChange.RESTART:
        tell = program.stop_timeout + start
    elif program.reload_command is not None:
        tell = RELOAD_COMMAND_TIMEOUT
    checks = [p for p in (file.confirm, program.ready) if p is not None]
    final = sum(3 * (p.interval + p.timeout) for p in checks)
    validate = file.validate_timeout if file.validate else 0.0
    return validate + tell + file.probation + final + WAIT_MARGIN


VERDICTS = ("config_confirmed", "config_rolled_back", "config_rejected")


def _mine(rec: dict[str, Any], target: Target, sha: str) -> bool:
    """Whether ``rec`` is about this version of this file."""
    if rec.get("path") != str(target.live):
        return False
    event = rec.get("event")
    if event == "config_rejected":
        return rec.get("actual") == sha
    if event == "config_applied":  # ours, or a newer one superseding ours
        return sha in (rec.get("sha256"), rec.get("previous_sha256"))
    return event in VERDICTS and rec.get("sha256") == sha


def _final(rec: dict[str, Any], sha: str) -> bool:
    if rec["event"] in VERDICTS:
        return True
    # an unchanged version (already live), or a newer one superseding ours
    return bool(rec.get("unchanged")) or rec.get("sha256") != sha


def wait_verdict(
    tail: history.Tail, target: Target, sha: str, seconds: float
) -> tuple[dict[str, Any] | None, bool]:
    """This version's verdict record if one comes in time, and whether it was applied."""
    deadline = time.monotonic() + seconds
    applied = False
    while True:
        for rec in tail.read_new():
            if not _mine(rec, target, sha):
                continue
            if _final(rec, sha):
                return rec, applied
            applied = True
            print(f"applied (sha256 {sha}); waiting for the program's verdict", flush=True)
        if time.monotonic() >= deadline:
            return None, applied
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


def describe_rollback(rec: dict[str, Any]) -> str:
    """What to tell the deployer; the program's words and errors escaped."""
    lines = [f"rolled back: {cli.escape(rec.get('reason'))}"]
    if rec.get("detail"):
        lines.append(f"  {cli.escape(rec['detail'])}")
    restored = rec.get("restored_sha256")
    lines.append(
        f"  restored sha256 {restored}" if restored else f"  {cli.escape(rec.get('error'))}"
    )
    tail = str(rec.get("output_tail") or "").strip()
    if tail:
        lines.append("  the reload command said:")
        lines += [f"    {cli.escape(line)}" for line in tail.splitlines()[-10:]]
    return "\n".join(lines)


def report(rec: dict[str, Any] | None, applied: bool, sha: str, waited: float) -> int:
    """Print the verdict; the exit code (0 only for a confirmed version)."""
    if rec is None:
        said = "applied, but no verdict" if applied else "staged; no gosup applied it"
        print(f"{said} within {waited:g}s")
        return cli.EXIT_FAILED
    event = rec["event"]
    if event == "config_confirmed":
        print(f"confirmed (sha256 {sha}) after {rec.get('probation_s', 0):g}s of probation")
        return cli.EXIT_OK
    if event == "config_applied" and rec.get("unchanged"):
        print(f"unchanged (sha256 {sha} is already live)")
        return cli.EXIT_OK
    if event == "config_applied":
        print(f"superseded by sha256 {rec.get('sha256')} before its verdict")
        return cli.EXIT_FAILED
    if event == "config_rolled_back":
        print(describe_rollback(rec))
    else:
        print(describe_rejection(rec))
    return cli.EXIT_FAILED


# -- the command ----------------------------------------------------------------------------


def _wait_seconds(args: argparse.Namespace, target: Target) -> float | None:
    """--wait as seconds; None for --no-wait."""
    if args.no_wait:
        return None
    if args.wait is not None:
        try:
            return parse_duration(args.wait)
        except ValueError as exc:
            raise cli.CLIError(f"--wait: {exc}", cli.EXIT_USAGE) from None
    if target.program is None or target.file is None:
        return WAIT_MARGIN
    return verdict_budget(target.program, target.file)


def cmd_stage(args: argparse.Namespace) -> int:
    new_file = Path(args.new_file)
    if not new_file.is_file():
        raise cli.CLIError(f"{new_file}: not a readable file", cli.EXIT_USAGE)
    target = find_target(args.live_path, args.config)
    wait = _wait_seconds(args, target)
    if not target.staging.parent.is_dir():
        raise cli.CLIError(f"{target.staging.parent}: no such directory", cli.EXIT_USAGE)
    # The history's end is taken before staging: no outcome can be missed.
    tail = history.Tail(target.state_dir / HISTORY_NAME) if target.state_dir else None
    try:
        return _stage_and_wait(new_file, target, tail, wait)
    finally:
        if tail is not None:
            tail.close()


def _stage_and_wait(
    new_file: Path, target: Target, tail: history.Tail | None, wait: float | None
) -> int:
    try:
        sha = stage_file(new_file, target.staging)
    except OSError as exc:
        raise cli.CLIError(f"cannot stage {new_file} at {target.staging}: {exc}") from None
    if target.state_dir is None or tail is None:
        print(cli.escape(f"staged at {target.staging} (sha256 {sha}); no gosup config to follow"))
        return cli.EXIT_OK
    if wait is None:
        print(f"staged (sha256 {sha}); not waiting for the verdict (--no-wait)")
        return cli.EXIT_OK
    if not gosup_running(target.state_dir):
        # Queued, not confirmed: only --no-wait makes queuing a success.
        print(
            f"staged (sha256 {sha}); gosup is not running: no verdict "
            "(checked and applied at its next start)"
        )
        return cli.EXIT_FAILED
    rec, applied = wait_verdict(tail, target, sha, wait)
    return report(rec, applied, sha, wait)
