"""The ``gosup`` command: the command line (``cli/``) with the daemon
(``service/``) behind ``run`` and ``check``.

This is the program's entry point and the one module that joins the two
halves: the command line never imports the daemon (``gosup status`` must
stay light, and the layers one-way), so it is handed this adapter. The
daemon is imported only when ``run`` or ``check`` asks for it, and ``gosup
status`` with simple arguments does not even import the parser's module.
"""

from __future__ import annotations

import sys

from supervisor.cli.common import EXIT_USAGE, CLIError, guarded

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Sequence

    from supervisor.config import AppConfig
    from supervisor.core.output import DroppingWriter


class Daemon:
    """``cli.commands.Daemon``: runs ``service.app``'s Supervisor."""

    def run(self, config: AppConfig, *, echo: bool, dev: bool) -> int:
        import asyncio

        from supervisor.config import ConfigError
        from supervisor.service import app
        from supervisor.service.daemon import StartupError

        async def main() -> int:
            return await app.build(config, echo=echo, dev=dev).run()

        try:
            return asyncio.run(main())
        except StartupError as exc:  # e.g. another gosup already runs with this state_dir
            raise CLIError(str(exc)) from None
        except ConfigError as exc:  # e.g. a user switch gosup has no right to make
            raise CLIError(str(exc), EXIT_USAGE) from None

    def privilege_errors(self, config: AppConfig) -> list[str]:
        from supervisor.service.daemon import privilege_errors

        return privilege_errors(config)

    def preflight(self, config: AppConfig) -> tuple[list[str], list[str]]:
        from supervisor.service import preflight

        return preflight.findings(config)

    def log_writer(self, fd: int) -> DroppingWriter:
        from supervisor.core.output import DroppingWriter

        return DroppingWriter(fd, label="stderr")


def _import_shutil_without_archives() -> None:
    """Import shutil with zlib, bz2 and lzma held back (issue 18, RSS).

    shutil imports the three (and libz, libbz2, liblzma: about 0.25 MiB of an
    idle daemon) only to say which archive formats ``make_archive`` offers;
    gosup uses ``which``, ``copymode``, ``copyfileobj`` and
    ``get_terminal_size`` (argparse). Held back, they are not imported and
    shutil's archive functions offer none of them; afterwards any of the
    three can be imported as usual."""
    held = [name for name in ("zlib", "bz2", "lzma") if name not in sys.modules]
    if "shutil" in sys.modules or not held:
        return
    for name in held:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import shutil  # noqa: F401
    finally:
        for name in held:
            sys.modules.pop(name, None)


def main(argv: Sequence[str] | None = None) -> int:
    """``gosup ARGS``: the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["status"]:
        # The short path: `gosup status` costs what it prints (docs/benchmarks.md),
        # so not even the parser's module is imported for it.
        from supervisor.cli import status

        ns = status.parse_fast(args[1:])
        if ns is not None:
            return guarded(lambda: status.cmd_status(ns))
    if args[:1] == ["reload"]:
        # Likewise `gosup reload` (-c/--socket only), which a deployment waits on:
        # without every subcommand's parser and module (stage's imports the config).
        import argparse

        from supervisor.cli import actions, status

        given = status.parse_fast(args[1:])
        if given is not None and not given.names and not given.json:
            target = argparse.Namespace(config=given.config, socket=given.socket)
            return guarded(lambda: actions.cmd_reload(target))
    if args[:1] == ["run"]:
        # The daemon: asyncio without ssl and libssl, loaded only once an https
        # target is used (core/tls.py). Now, before loguru imports asyncio.
        from supervisor.core import tls

        tls.import_asyncio_without_ssl()
        _import_shutil_without_archives()
    from supervisor.cli.commands import main as cli_main

    return cli_main(args, daemon=Daemon())


if __name__ == "__main__":
    sys.exit(main())
