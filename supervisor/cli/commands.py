"""argparse front end: every subcommand's options, ``run`` and ``check``, and
``main``, the one place that turns an error into a message and an exit code.

The other commands live in one module each (``status``, ``actions``,
``historyview``, ``stage``), none of which imports this one. Heavy modules
(psutil, loguru, the daemon) are imported inside the commands that need
them, and ``gosup status`` with simple arguments skips the parser (and the
other commands' modules) entirely, so client commands start fast: even
argparse and typing are imported only once the parser is built (``gosup
status`` costs what it prints, docs/benchmarks.md).
"""

from __future__ import annotations

import os
import sys

from supervisor import __version__
from supervisor.cli import status
from supervisor.cli.common import (
    DEFAULT_CONFIG,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    guarded,
    load_config,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Protocol, TypeAlias

    from supervisor import config as configmod

    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

    class LogWriter(Protocol):
        """Where gosup's own log goes: ``write`` never blocks (DESIGN §1)."""

        def write(self, data: bytes) -> object: ...

        def close(self, timeout: float = 1.0) -> None: ...

    class Daemon(Protocol):
        """What ``run`` and ``check`` need of the daemon (``supervisor/service/``).

        Handed in by the program's entry point (``supervisor/gosup.py``): the
        command line never imports the daemon itself, so ``gosup status`` stays
        light and the layers stay one-way.
        """

        def run(self, config: configmod.AppConfig, *, echo: bool, dev: bool) -> int:
            """Run in the foreground until told to stop; CLIError when gosup cannot."""
            ...

        def privilege_errors(self, config: configmod.AppConfig) -> list[str]:
            """The user/group switches gosup, run as this user, could not make."""
            ...

        def preflight(self, config: configmod.AppConfig) -> tuple[list[str], list[str]]:
            """(errors, warnings) a start would run into: missing or unexecutable binaries."""
            ...

        def log_writer(self, fd: int) -> LogWriter:
            """A writer for gosup's own log on ``fd`` that never blocks the daemon."""
            ...

# -- run / check ----------------------------------------------------------------


def setup_logging(verbose: bool, writer: LogWriter) -> Callable[[], None]:
    """gosup's own log, on stderr through ``writer`` (the daemon's, see
    ``Daemon.log_writer``): a queue that a thread writes from, so a reader
    that stops reading (a paused ``| less``, a journald backlog) loses
    messages, counted, and never stalls supervision. Returns the closer
    ``run`` calls at exit (it waits a second at most for the queue)."""
    import contextlib

    from loguru import logger

    logger.remove()
    under_systemd = "JOURNAL_STREAM" in os.environ or "INVOCATION_ID" in os.environ
    fmt = (
        "gosup {level}: {message}"
        if under_systemd
        else (
            "<dim>{time:HH:mm:ss.SSS}</dim> <bold>gosup</bold> <level>{level: <7}</level> {message}"
        )
    )

    def sink(message: str) -> None:
        writer.write(message.encode("utf-8", "replace"))

    sink_id = logger.add(
        sink,
        level="DEBUG" if verbose else "INFO",
        format=fmt,
        colorize=not under_systemd and sys.stderr.isatty(),
        backtrace=False,
        diagnose=False,
    )

    def close() -> None:
        with contextlib.suppress(ValueError):
            logger.remove(sink_id)
        writer.close()

    return close


def cmd_run(args: argparse.Namespace, daemon: Daemon) -> int:
    config = load_config(args.config)
    close_log = setup_logging(args.verbose, daemon.log_writer(sys.stderr.fileno()))
    echo = sys.stdout.isatty() if args.echo is None else args.echo
    try:
        return daemon.run(config, echo=echo, dev=args.dev)
    finally:
        close_log()


def cmd_check(args: argparse.Namespace, daemon: Daemon) -> int:
    from supervisor import config as configmod

    errors = configmod.check_file(args.config)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return EXIT_USAGE
    config = configmod.load(args.config)
    # A user switch or capabilities gosup could not grant: `check` may run as
    # another user than gosup (a warning then), but what root cannot grant, no
    # gosup can: run as root, `check` refuses it like `run` would.
    privileges = daemon.privilege_errors(config)
    as_root = os.geteuid() == 0
    if not as_root:
        for note in privileges:
            print(f"warning: {note} (an error when gosup runs as this user)", file=sys.stderr)
    errors, warnings = daemon.preflight(config)
    errors = [*privileges, *errors] if as_root else errors
    for note in warnings:
        print(f"warning: {note}", file=sys.stderr)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.config}: ok ({len(config.programs)} programs)")
    return EXIT_OK


# -- parser -------------------------------------------------------------------------


def _add_config(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument(
            "config",
            nargs="?",
            default=DEFAULT_CONFIG,
            help="the app.toml to use (default: ./app.toml)",
        )
    else:
        p.add_argument(
            "-c",
            "--config",
            default=DEFAULT_CONFIG,
            help="the app.toml of that gosup (default: ./app.toml)",
        )


def _add_target(p: argparse.ArgumentParser) -> None:
    """Which running gosup a client command talks to."""
    _add_config(p)
    p.add_argument("--socket", metavar="PATH", help="talk to the gosup at this control socket")


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="gosup",
        description="A self-healing process supervisor for Go services.",
        epilog="Exit codes: 0 done, 1 the operation failed, 2 usage or config error, "
        "3 no gosup is running there, 141 the reader of the output went away "
        "(gosup history | head).",
    )
    parser.add_argument("--version", action="version", version=f"gosup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_daemon_parsers(sub)
    _add_history_parser(sub)
    _add_client_parsers(sub)
    _add_stage_parser(sub)
    _add_logs_parser(sub)
    return parser


def _add_daemon_parsers(sub: Subparsers) -> None:
    import argparse

    p = sub.add_parser("run", help="run the programs of CONFIG in the foreground")
    _add_config(p, positional=True)
    p.add_argument(
        "--echo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print the programs' output with a 'name |' prefix "
        "(default: when stdout is a terminal)",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="development mode: build programs that have a [build] section before "
        "starting them, rebuild and restart on source change, apply app.toml on save",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check", help="validate CONFIG: exit 0, or 2 with every error on stderr")
    _add_config(p, positional=True)
    p.set_defaults(func=cmd_check)


# The other commands' modules are imported while building the parser, which
# `gosup status`'s short path never does: it loads only status and client.


def _add_history_parser(sub: Subparsers) -> None:
    from supervisor.cli import historyview

    p = sub.add_parser("history", help="show the restart history (works while gosup is down)")
    _add_config(p)
    p.add_argument("--state-dir", help="read STATE_DIR/history.jsonl instead of the config's")
    p.add_argument("-n", type=int, default=20, help="show the last N records (default 20)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--program", metavar="NAME", help="only records of program NAME")
    p.add_argument("--json", action="store_true", help="raw JSON lines")
    p.add_argument(
        "--max-scan",
        metavar="SIZE",
        default="64MiB",
        help="look back through at most SIZE of the history for the last N records "
        "(default 64MiB; 0 = all of it); a note on stderr says when it stopped there",
    )
    p.set_defaults(func=historyview.cmd_history)


def _add_client_parsers(sub: Subparsers) -> None:
    from supervisor.cli import actions

    p = sub.add_parser("status", help="show the state of every program (or of NAME...)")
    _add_target(p)
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--json", action="store_true", help='print {"programs": [...]} as JSON')
    p.set_defaults(func=status.cmd_status)

    for cmd, what in (("start", "start"), ("stop", "stop"), ("restart", "restart")):
        p = sub.add_parser(cmd, help=f"{what} programs (NAME... or all) and wait for it")
        _add_target(p)
        p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
        p.set_defaults(func=actions.cmd_program)

    p = sub.add_parser("signal", help="send SIGNAL (HUP, USR1, SIGUSR2, 10 ...) to programs")
    _add_target(p)
    p.add_argument("signal", metavar="SIGNAL")
    p.add_argument("names", nargs="+", metavar="NAME", help="program names, or all")
    p.set_defaults(func=actions.cmd_signal)

    p = sub.add_parser("reload", help="re-read app.toml and apply the difference")
    _add_target(p)
    p.set_defaults(func=actions.cmd_reload)

    p = sub.add_parser("shutdown", help="stop every program and end gosup")
    _add_target(p)
    p.add_argument("--no-wait", action="store_true", help="return without waiting for the end")
    p.set_defaults(func=actions.cmd_shutdown)

    p = sub.add_parser("dump", help="save a goroutine dump of NAME now (under state_dir/dumps/)")
    _add_target(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=actions.cmd_dump)


def _add_stage_parser(sub: Subparsers) -> None:
    from supervisor.cli import stage

    p = sub.add_parser(
        "stage",
        help="hand a new config version to gosup (verified, validated, swapped atomically)",
        description="Copy NEW_FILE to the staging path of LIVE_PATH with its .sha256 "
        "sidecar, then wait for the program's verdict. Exit 0 confirmed (or only "
        "queued, with --no-wait), 1 rejected, rolled back, superseded, no verdict in "
        "time, or no gosup running to give one (the reason is printed), 2 usage error.",
    )
    p.add_argument("new_file", metavar="NEW_FILE", help="the new version")
    p.add_argument(
        "live_path",
        metavar="LIVE_PATH",
        help="the live config file it replaces; a relative path is relative to the "
        "config file's directory, like every path in app.toml",
    )
    p.add_argument(
        "-c",
        "--config",
        default=None,
        help="the app.toml naming LIVE_PATH in config_files (default: ./app.toml)",
    )
    wait = p.add_mutually_exclusive_group()
    wait.add_argument(
        "--wait",
        default=None,
        metavar="DUR",
        help="how long to wait for the verdict, e.g. 90s (default: the file's probation "
        "plus the time to reload or restart and get ready, plus 10s)",
    )
    wait.add_argument(
        "--no-wait",
        action="store_true",
        help="only stage the file (exit 0 once it is queued)",
    )
    p.set_defaults(func=stage.cmd_stage)


def _add_logs_parser(sub: Subparsers) -> None:
    from supervisor.cli import logs

    logs.add_parser(sub)


def _fast_path(argv: list[str]) -> int | None:
    """`gosup status` must feel instant: with simple arguments it skips building
    every subcommand's parser."""
    if argv[:1] != ["status"]:
        return None
    return status.fast_status(argv[1:])  # None: let argparse handle these arguments


def main(argv: Sequence[str] | None = None, daemon: Daemon | None = None) -> int:
    """Run one gosup command; ``daemon`` serves ``run`` and ``check``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: _dispatch(args, daemon))


def _dispatch(argv: list[str], daemon: Daemon | None) -> int:
    code = _fast_path(argv)
    if code is not None:
        return code
    args = build_parser().parse_args(argv)
    if args.func in (cmd_run, cmd_check):
        if daemon is None:
            raise CLIError(f"{args.command}: no daemon was handed to the command line")
        return int(args.func(args, daemon))
    return int(args.func(args))
