"""Building in development mode: which file changes are sources, how they
reach the loop, and running the build command without ever blocking it.

Sources: ``[build] watch`` globs under ``[build] directory``, minus
``ignore``, minus ``DEFAULT_IGNORE`` (VCS data, vendored code, editors'
temporary files), minus gosup's own files and the binary the build writes.
Globs are .gitignore lines, matched by ``pathspec``: a glob without '/'
matches a name at any depth ("*.go", "vendor"), one with '/' matches from the
build directory ("cmd/**/*.go"), '**' spans directories, and a glob that
matches a directory covers everything below it.

Watching (the observers themselves are in ``watching``): the source filter
runs in watchdog's thread, so only a path worth a rebuild reaches the loop;
the debounce (``settle``) is the loop's.

Running: a build is a child like any other, started by ``spawn.start_child``
as a program is (see spawn.py for why asyncio's subprocess machinery is
avoided): its own session, the parent-death signal and gosup's marks, its
exit learnt through a pidfd on the event loop, its output read by a pipe
protocol, and only ``Popen`` ever reaps it. Cancelling ``run`` (a newer
change arrived, or gosup is stopping) SIGKILLs the build's whole process
group: ``go build`` runs the compiler and linker as children, and none of
them may outlive the build that started them. Builds run as gosup's own user.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pathspec
from loguru import logger
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
)

from supervisor.config import BuildSpec, ProgramSpec
from supervisor.core import spawn
from supervisor.core.lines import LineSplitter, Tail
from supervisor.core.output import PipeReader
from supervisor.files import watching

# Never sources: VCS data, vendored code, and editors' temporary files (vim's
# swap files and its "4913" write test, emacs lock files, backups).
DEFAULT_IGNORE = (".git", "vendor", "*.swp", "*.swx", "*~", "4913", ".#*")
POLL_INTERVAL = 0.5  # when inotify is not available (watch limit reached, odd filesystems)
# Writes, creations, deletions and renames; never opens or reads (the build reads every source).
_CHANGE_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileClosedEvent,
]
TAIL_LINES = 40  # what a failed build keeps of its output for the history and the log
TAIL_CHARS = 4000
_KEEP_BYTES = 64 * 1024
MAX_LINE = 64 * 1024  # a longer "line" of build output is logged in pieces
EOF_GRACE = 1.0  # how long output may trail the exit (a leftover holding the pipe)


# -- sources -----------------------------------------------------------------------


class Globs:
    """A list of globs matched like .gitignore lines (see the module docstring)."""

    def __init__(self, globs: Iterable[str]) -> None:
        self._spec = pathspec.GitIgnoreSpec.from_lines(_gitignore_line(g) for g in globs)

    def match(self, rel: str) -> bool:
        """Does ``rel`` (relative, '/'-separated) or one of its directories match?"""
        return self._spec.match_file(rel)


def _gitignore_line(glob: str) -> str:
    """A glob as a .gitignore line: surrounding blanks and a leading "./" dropped;
    a leading '#' is a name here, not a comment."""
    line = glob.strip().removeprefix("./")
    return "\\" + line if line.startswith("#") else line


class SourceFilter:
    """Which paths under a build directory are sources worth a rebuild."""

    def __init__(self, spec: BuildSpec, never: tuple[Path, ...], binary: Path | None) -> None:
        self.root = str(spec.directory)
        self.watch = Globs(spec.watch)
        self.ignore = Globs(DEFAULT_IGNORE + spec.ignore)
        # gosup's own files (logs, history, app.toml) and the build's output.
        self.never = tuple(str(p) for p in never)
        self.binary = str(binary) if binary is not None else None

    def __call__(self, path: str) -> bool:
        if any(path == p or path.startswith(p + os.sep) for p in self.never):
            return False
        # The binary, and go build's probe of its directory "<output>-go-tmp-umask";
        # not every name it begins: "server.go" is the source of "server".
        if self.binary is not None and (
            path == self.binary or path.startswith(self.binary + "-go-tmp-")
        ):
            return False
        rel = os.path.relpath(path, self.root)
        if rel.startswith(".." + os.sep) or rel == "..":
            return False
        rel = rel.replace(os.sep, "/")
        return not self.ignore.match(rel) and self.watch.match(rel)


# -- watching ---------------------------------------------------------------------


def _source_path(wanted: Callable[[str], bool], event: FileSystemEvent) -> str | None:
    """In watchdog's thread: the path of the event that matters, if any."""
    if event.is_directory:
        return None
    for raw in (event.dest_path, event.src_path):
        path = os.fsdecode(raw)
        if path and wanted(path):
            return path
    return None


class Watcher(watching.Watch[str]):
    """A watch of ``root``; the paths that ``wanted`` keeps reach ``notify`` on the loop."""

    def __init__(
        self,
        root: Path,
        *,
        recursive: bool,
        wanted: Callable[[str], bool],
        notify: Callable[[str], None],
    ) -> None:
        super().__init__(
            {root},
            pick=functools.partial(_source_path, wanted),
            deliver=notify,
            event_filter=_CHANGE_EVENTS,
            label=str(root),
            poll_interval=POLL_INTERVAL,
            recursive=recursive,
        )


async def settle(changed: asyncio.Event, quiet: float, cap: float) -> None:
    """Return once ``changed`` has stayed clear for ``quiet`` seconds (editors
    save in bursts), or after ``cap`` seconds whatever happens."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cap
    while True:
        changed.clear()
        wait = min(quiet, deadline - loop.time())
        if wait <= 0:
            return
        try:
            async with asyncio.timeout(wait):
                await changed.wait()
        except TimeoutError:
            return


class LogLines:
    """Build output into gosup's log, one record per line (when nothing is echoed)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lines = LineSplitter(MAX_LINE)

    def feed(self, data: bytes) -> None:
        self._log(self._lines.feed(data))

    def flush(self) -> None:
        self._log(self._lines.flush())

    def _log(self, lines: list[bytes]) -> None:
        for line in lines:
            logger.info("{} build | {}", self.name, line.decode("utf-8", "replace").rstrip())


# -- running ------------------------------------------------------------------------


class Sink(Protocol):
    """Where the build's output goes as it arrives (output.TerminalEcho fits)."""

    def feed(self, data: bytes) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class BuildResult:
    ok: bool
    exit_code: int | None  # None: the command could not be started at all
    duration_s: float
    output_tail: str


def build_environment(program: ProgramSpec, marks: Mapping[str, str]) -> dict[str, str]:
    """gosup's environment with the program's ``environment`` over it, and gosup's
    ``marks`` (``spawn.marks``: what the build leaves behind is found again).

    The same variables the program sees (GOFLAGS, GOPRIVATE, CGO_ENABLED ...),
    minus what gosup derives for running it (GOMEMLIMIT is for the service,
    not for the compiler).
    """
    return spawn.child_environment(program, None, marks)


class BuildOutput:
    """Passes the build's output on to a sink and keeps its tail."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self._kept = Tail(_KEEP_BYTES)

    def feed(self, data: bytes) -> None:
        self.sink.feed(data)
        self._kept.feed(data)

    def flush(self) -> None:
        self.sink.flush()

    def note(self, text: str) -> None:
        """Add gosup's own words (why the build could not start) to the output."""
        self.feed(text.encode() + b"\n")

    def tail(self) -> str:
        text = self._kept.text().rstrip()
        return "\n".join(text.splitlines()[-TAIL_LINES:])[-TAIL_CHARS:]


async def run(
    spec: BuildSpec,
    env: dict[str, str],
    output: BuildOutput,
    clock: Callable[[], float] = time.monotonic,
) -> BuildResult:
    """Run the build to its end; cancelling it kills the build's process group."""
    began = clock()
    try:
        child = _start(spec, env)
    except spawn.SpawnError as exc:
        output.note(f"cannot start the build: {exc}")
        output.flush()
        return BuildResult(False, None, round(clock() - began, 3), output.tail())
    loop = asyncio.get_running_loop()
    eof: asyncio.Future[None] = loop.create_future()
    pipe = child.popen.stdout
    assert pipe is not None
    transport: asyncio.BaseTransport | None = None
    try:
        transport, _ = await loop.connect_read_pipe(lambda: PipeReader(output.feed, eof), pipe)
        # asyncio.wait, not await: cancelling us must not cancel `exited`,
        # which the kill below still needs to see resolved.
        await asyncio.wait([child.exited])
        _kill_group(child.pid)  # whatever the build left running in its group
        await asyncio.wait([eof], timeout=EOF_GRACE)
    except asyncio.CancelledError:
        _kill_group(child.pid)
        await asyncio.wait([child.exited], timeout=5.0)
        raise
    finally:
        if transport is not None:
            transport.close()  # closes the pipe too
        else:
            pipe.close()
        output.flush()
    code: int = child.exited.result()
    return BuildResult(code == 0, code, round(clock() - began, 3), output.tail())


def _start(spec: BuildSpec, env: dict[str, str]) -> spawn.Child:
    if not spec.directory.is_dir():
        raise spawn.SpawnError(f"build directory {str(spec.directory)!r} does not exist")
    # One stream: the compiler's errors in order with the rest.
    popen = spawn.start_child(spec.command, spec.directory, env, stderr=subprocess.STDOUT)
    return spawn.Child(popen, spec.command[0])


def _kill_group(pgid: int) -> None:
    # While any member remains, Linux does not reuse the group's id for a new
    # process; once none does, this is ESRCH (short of the pid space wrapping
    # round between the build's exit and this call).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
