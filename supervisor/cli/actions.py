"""The commands that act on a running gosup: start, stop, restart, signal,
reload, shutdown, dump (docs/control.md).

Stdlib only at import time, like every client command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from supervisor.cli.client import call, connect
from supervisor.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CLIError, escape


def _targets(names: list[str]) -> dict[str, Any]:
    """Program names as the protocol takes them: "all" alone means every program."""
    if names == ["all"]:
        return {"all": True}
    if "all" in names:
        raise CLIError("'all' cannot be combined with program names", EXIT_USAGE)
    return {"names": names}


def _report(reply: dict[str, Any]) -> int:
    """Print per-program results (failures on stderr); 0 when all succeeded."""
    data = reply.get("data")
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        if not reply["ok"]:
            raise CLIError(str(reply.get("error", "failed")))
        return EXIT_OK
    if not results:
        print("nothing to do: no program matched")
    for r in results:
        if r.get("ok"):
            print(escape(r.get("message")))
        else:
            print(f"gosup: {escape(r.get('error'))}", file=sys.stderr)
    return EXIT_OK if reply["ok"] else EXIT_FAILED


def _act(args: argparse.Namespace, cmd: str, **fields: Any) -> int:
    # No timeout: a stop lasts up to stop_timeout, a start start_seconds.
    with connect(args) as conn:
        return _report(conn.request(cmd, **fields))


def cmd_program(args: argparse.Namespace) -> int:
    return _act(args, args.command, **_targets(args.names))


def cmd_signal(args: argparse.Namespace) -> int:
    from supervisor import config as configmod

    try:
        sig = configmod.parse_signal(args.signal)
    except ValueError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from None
    return _act(args, "signal", signal=sig.name, **_targets(args.names))


def cmd_reload(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        reply = conn.request("reload")
    data = reply.get("data") or {}
    if not reply["ok"]:
        errors = data.get("errors") if isinstance(data, dict) else None
        if errors:  # app.toml is invalid: a config error, exit 2
            print("gosup: reload refused, nothing changed:", file=sys.stderr)
            for error in errors:
                print(escape(error), file=sys.stderr)
            return EXIT_USAGE
        raise CLIError(str(reply.get("error")))
    # "changed": how they run changed, so they were restarted; "updated": the
    # new settings apply to the running process (an older gosup sends none).
    said = {
        "added": "added",
        "removed": "removed",
        "changed": "restarted",
        "updated": "updated in place",
    }
    parts = [f"{what} {', '.join(data.get(k) or []) or '-'}" for k, what in said.items()]
    print(escape("reloaded: " + "; ".join(parts)))
    return EXIT_OK


def cmd_shutdown(args: argparse.Namespace) -> int:
    with connect(args) as conn:
        reply = conn.request("shutdown")
        if not reply["ok"]:
            raise CLIError(str(reply.get("error")))
        if not args.no_wait:
            conn.wait_closed()  # gosup closes the socket once every program has stopped
    print("gosup stopped" if not args.no_wait else "gosup is shutting down")
    return EXIT_OK


def cmd_dump(args: argparse.Namespace) -> int:
    data = call(args, "dump", name=args.name)
    print(escape(data.get("path", data) if isinstance(data, dict) else data))
    return EXIT_OK
