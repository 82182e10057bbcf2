"""argparse front end: the only place that prints for humans and exits.

Heavy modules (psutil, loguru, the daemon) are imported inside the commands
that need them, so client commands such as ``gosup status`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from supervisor import __version__
from supervisor.cli import client, historyview, stage
from supervisor.cli.common import (
    DEFAULT_CONFIG,
    EXIT_OK,
    EXIT_USAGE,
    CLIError,
    load_config,
)

# -- run / check ----------------------------------------------------------------


def setup_logging(verbose: bool) -> None:
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
    logger.add(
        sys.stderr,
        level="DEBUG" if verbose else "INFO",
        format=fmt,
        colorize=None if not under_systemd else False,
        backtrace=False,
        diagnose=False,
    )


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    config = load_config(args.config)
    setup_logging(args.verbose)
    from supervisor import config as configmod
    from supervisor.service import app
    from supervisor.service.daemon import StartupError

    echo = sys.stdout.isatty() if args.echo is None else args.echo

    async def main() -> int:
        return await app.build(config, echo=echo, dev=args.dev).run()

    try:
        return asyncio.run(main())
    except StartupError as exc:  # e.g. another gosup already runs with this state_dir
        raise CLIError(str(exc)) from None
    except configmod.ConfigError as exc:  # e.g. a user switch gosup has no right to make
        raise CLIError(str(exc), EXIT_USAGE) from None


def cmd_check(args: argparse.Namespace) -> int:
    from supervisor import config as configmod

    errors = configmod.check_file(args.config)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return EXIT_USAGE
    config = configmod.load(args.config)
    from supervisor.service.daemon import privilege_errors

    for note in privilege_errors(config):  # `check` may run as another user than gosup
        print(f"warning: {note} (an error when gosup runs as this user)", file=sys.stderr)
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
            help="the app.toml of the gosup to talk to (default: ./app.toml)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gosup",
        description="A self-healing process supervisor for Go services.",
        epilog="Exit codes: 0 done, 1 the operation failed, 2 usage or config error, "
        "3 no gosup is running there.",
    )
    parser.add_argument("--version", action="version", version=f"gosup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    p = sub.add_parser("history", help="show the restart history (works while gosup is down)")
    _add_config(p)
    p.add_argument("--state-dir", help="read STATE_DIR/history.jsonl instead of the config's")
    p.add_argument("-n", type=int, default=20, help="show the last N records (default 20)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records")
    p.add_argument("--program", metavar="NAME", help="only records of program NAME")
    p.add_argument("--json", action="store_true", help="raw JSON lines")
    p.set_defaults(func=historyview.cmd_history)

    client.add_parsers(sub)
    stage.add_parser(sub)
    return parser


def _fast_path(argv: list[str]) -> int | None:
    """`gosup status` must feel instant: with simple arguments it skips building
    every subcommand's parser (and importing the other client modules)."""
    if argv[:1] != ["status"]:
        return None
    from supervisor.cli.client import fast_status

    return fast_status(argv[1:])  # None: let argparse handle these arguments


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _fast_path(argv)
        if code is None:
            args = build_parser().parse_args(argv)
            code = args.func(args)
    except CLIError as exc:
        print(f"gosup: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    return code
