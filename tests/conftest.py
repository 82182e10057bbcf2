"""Shared fixtures: Go binaries built once per session, a real `gosup run`
driver, deadline-based waiting, and a check that every test leaves no process
behind.

Leak check: each test gets a unique tag in its environment
(GOSUP_TEST_TAG). Everything a test starts (gosup, its children, their
grandchildren, even ones that left the process group or were re-parented to
init) inherits it, so after the test we look for any process still carrying
the tag, plus every descendant of such a process (one that cleared its
environment) and every new descendant of the test process itself, zombies
included, and fail the test if one is found. The scan is psutil's, from the
test side: it never goes through gosup's own code (orphans.py), so a bug
there cannot hide a leak in every test at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import gobuild


def _default_signals_for_the_tests() -> None:
    """A run started as a background job of a script (``bash .ci/run &``)
    gets SIGINT and SIGQUIT ignored, and every process the tests start
    would inherit that: a ``gosup history -f`` the test ends with SIGINT
    would ignore it, as ``tail -f`` would. The tests expect what an
    operator's terminal gives: the default actions. (What gosup does when
    it is itself started ignoring signals: tests/test_signal_dispositions.py.)"""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)


_default_signals_for_the_tests()

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
TAG_VAR = "GOSUP_TEST_TAG"


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def gosup_check(config: Path) -> subprocess.CompletedProcess[str]:
    """``gosup check CONFIG`` run as an operator would, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command
    in ``directory`` (the test is skipped without openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


# -- Go fixtures ----------------------------------------------------------------


@pytest.fixture(scope="session")
def go_bin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gobin")


@pytest.fixture(scope="session")
def goapp(go_bin_dir: Path) -> Path:
    """The multi-mode Go test program (tests/fixtures/goapp), built once."""
    return gobuild.build(FIXTURES / "goapp", go_bin_dir / "goapp")


# -- leak check --------------------------------------------------------------------


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes other than this one whose environment has GOSUP_TEST_TAG=tag.

    A zombie's environment cannot be read any more: zombies are found as
    descendants instead (see `leftovers`)."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
    return found


def _key(proc: psutil.Process) -> tuple[int, float]:
    """A process's identity across pid reuse."""
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return proc.pid, 0.0


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def leftovers(tag: str, before: set[tuple[int, float]]) -> list[psutil.Process]:
    """What a test left: tagged processes, their descendants, and the descendants
    of this process that were not there before the test (``before``), zombies included."""
    found: dict[tuple[int, float], psutil.Process] = {}
    for proc in tagged_processes(tag):
        for p in (proc, *_descendants(proc)):
            found.setdefault(_key(p), p)
    for p in _descendants(psutil.Process()):
        found.setdefault(_key(p), p)
    return [p for key, p in found.items() if key not in before and p.is_running()]


def _describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            what = f"pid {p.pid} (parent {p.ppid()}) {p.status()} {p.name()!r}"
            with contextlib.suppress(psutil.Error):  # a zombie has no command line
                what += f" {p.cmdline()[:4]}"
            out.append(what)
    return "; ".join(out)


def _remove(procs: list[psutil.Process]) -> None:
    """Kill what a failed test left, and reap our own zombies, so the next test starts clean."""
    me = os.getpid()
    for p in procs:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if p.ppid() == me and p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
            else:
                p.kill()


@pytest.fixture(scope="session", autouse=True)
def exec_helper_made() -> None:
    """gosup's exec helper (core/exechelper.py) is a memfd kept open for the
    life of the process, made at its first start: made before any test counts
    the fds it leaves open (``no_leftover_processes``)."""
    from supervisor.core import exechelper

    exechelper.path()


@pytest.fixture(autouse=True)
def no_leftover_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Fail the test if any process it started (at any depth) outlives it, even as a zombie."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG_VAR, tag)
    before = {_key(p) for p in _descendants(psutil.Process())}
    fds_before = set(os.listdir("/proc/self/fd"))
    yield tag
    left: list[psutil.Process] = []
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        left = leftovers(tag, before)
        if not left:
            break
        time.sleep(0.05)
    if left:
        desc = _describe(left)
        _remove(left)
        pytest.fail(f"processes left behind: {desc}")
    leaked_fds = set(os.listdir("/proc/self/fd")) - fds_before
    # fds the test process itself still holds open (pipes to gosup, files)
    leaked = {fd for fd in leaked_fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"file descriptors left open: {leaked}"


# -- a real gosup ------------------------------------------------------------------


class Gosup:
    """`gosup run app.toml` as a user runs it, in a temp directory."""

    def __init__(self, directory: Path, config_text: str, args: tuple[str, ...] = ()) -> None:
        self.dir = directory
        self.config = directory / "app.toml"
        self.config.write_text(textwrap.dedent(config_text))
        self.state_dir = directory / ".gosup"
        self.log_dir = directory / "logs"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = directory / "gosup.out"
        self.err = directory / "gosup.err"

    def start(
        self,
        extra_env: dict[str, str] | None = None,
        ignoring: tuple[str, ...] = (),
        session: bool = False,
    ) -> Gosup:
        """Start gosup; ``ignoring``: with these signals ("INT", "QUIT" ...)
        ignored, as a shell script's background job or nohup starts it (sh's
        ``trap ''`` then ``exec``: gosup keeps the pid); ``session``: in a
        session of its own, as systemd starts it (else it shares the tests')."""
        env = dict(os.environ, **(extra_env or {}))
        argv = [sys.executable, "-m", "supervisor", "run", str(self.config), *self.args]
        if ignoring:
            argv = ["sh", "-c", f"trap '' {' '.join(ignoring)}; exec \"$@\"", "sh", *argv]
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.dir,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=session,
            )
        return self

    def cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run a gosup client command against this instance's config."""
        return subprocess.run(
            [sys.executable, "-m", "supervisor", *args],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def history(self, program: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        path = self.state_dir / "history.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if program is not None and rec.get("program") != program:
                    continue
                if event is not None and rec.get("event") != event:
                    continue
                records.append(rec)
        return records

    def wait_event(
        self,
        event: str,
        program: str | None = None,
        count: int = 1,
        timeout: float = 15.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` records of ``event`` exist; return them."""

        def found() -> list[dict[str, Any]] | None:
            self.assert_alive()
            recs = [r for r in self.history(program, event) if where is None or where(r)]
            return recs if len(recs) >= count else None

        result: list[dict[str, Any]] = wait_for(
            found, timeout, f"{count} x {event!r} for {program} in history"
        )
        return result

    def running_pid(self, program: str, timeout: float = 15.0) -> int:
        """Pid of the program's newest run once it is RUNNING."""
        recs = self.wait_event("running", program, timeout=timeout)
        return int(recs[-1]["pid"])

    def assert_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"gosup exited with {self.proc.returncode}:\n{self.err.read_text()[-3000:]}"
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"gosup did not stop:\n{self.err.read_text()[-3000:]}") from None

    def log(self) -> str:
        return self.err.read_text()


@pytest.fixture
def gosup_factory(tmp_path: Path) -> Iterator[Callable[..., Gosup]]:
    """Make (and afterwards stop) gosup instances in this test's temp dir."""
    made: list[Gosup] = []

    def make(config_text: str, *args: str, subdir: str = "") -> Gosup:
        directory = tmp_path / subdir if subdir else tmp_path
        directory.mkdir(parents=True, exist_ok=True)
        g = Gosup(directory, config_text, args)
        made.append(g)
        return g

    yield make
    for g in made:
        if g.proc is not None and g.proc.poll() is None:
            g.stop()


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def public_goapp(goapp: Path) -> Iterator[Path]:
    """goapp where an unprivileged user (nobody, a useradd user) may run it:
    pytest's tmp dirs are 0700."""
    directory = Path(tempfile.mkdtemp(prefix="gosup-public-"))
    try:
        directory.chmod(0o755)
        binary = directory / "goapp"
        shutil.copy2(goapp, binary)
        binary.chmod(0o755)
        yield binary
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test, for a full disk (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; return the filler file."""
    filler = directory / "filler"
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False
    )
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as f:
        while f.write(b"\0" * 64):  # the last partial page
            pass
    return filler
