"""Install the incumbents into bench/.cache (git-ignored), once.

- supervisord and circus (and py-spy, for profiling gosup) from PyPI into the
  venv bench/.cache/venv;
- pm2 from the npm registry into bench/.cache/npm.

An incumbent that cannot be installed is reported with the reason (the
benchmarks then skip it and say why); nothing here ever fails the whole run.
A file lock keeps two bench scripts started at once from installing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common

VENV = common.CACHE / "venv"
NPM = common.CACHE / "npm"
PY_PACKAGES = ("supervisor", "circus", "py-spy")
INSTALL_TIMEOUT = 900.0


def gosup_python() -> str:
    """The interpreter that runs gosup: the project venv's (run.py is run from it)."""
    venv = common.ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def compile_gosup() -> None:
    """gosup's bytecode, compiled once before anything is timed (with
    PYTHONDONTWRITEBYTECODE set, every timed command would compile it)."""
    run = subprocess.run(
        [gosup_python(), "-m", "compileall", "-q", str(common.ROOT / "supervisor")],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(f"compileall failed: {run.stdout[-500:]}{run.stderr[-500:]}")


def venv_bin(name: str) -> Path:
    return VENV / "bin" / name


def pm2_bin() -> Path:
    return NPM / "node_modules" / "pm2" / "bin" / "pm2"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    common.CACHE.mkdir(parents=True, exist_ok=True)
    with open(common.CACHE / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(argv: list[str], cwd: Path | None = None) -> str | None:
    """Run an installer step; None when it worked, else the reason (last lines of output)."""
    env = common.bench_env("install", scrub_python=True)
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv[:3])}: {exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return f"{' '.join(argv[:3])} exited {done.returncode}: " + " / ".join(tail)
    return None


def _python_incumbents() -> str | None:
    if venv_bin("supervisord").exists() and venv_bin("circusd").exists():
        return None
    if not venv_bin("python").exists():
        reason = _run([sys.executable, "-m", "venv", str(VENV)])
        if reason:
            return reason
    pip = [str(venv_bin("python")), "-m", "pip", "install", "-q", "--retries", "1"]
    return _run([*pip, "--timeout", "60", *PY_PACKAGES])


def _pm2() -> str | None:
    if pm2_bin().exists():
        return None
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return "node/npm not found on PATH (apt-get install nodejs npm)"
    NPM.mkdir(parents=True, exist_ok=True)
    pkg = NPM / "package.json"
    if not pkg.exists():
        pkg.write_text('{"private": true}\n')
    return _run([npm, "install", "--no-audit", "--no-fund", "pm2"], cwd=NPM)


def _py_version(dist: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        out = subprocess.run(
            [str(venv_bin("python")), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=common.bench_env("version", scrub_python=True),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _gosup() -> dict[str, Any]:
    code = "import supervisor.service.daemon, supervisor; print(supervisor.__version__)"
    try:
        out = subprocess.run(
            [gosup_python(), "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=common.ROOT,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "version": None, "reason": str(exc)}
    if out.returncode != 0:
        reason = f"cannot import gosup with {gosup_python()}: {out.stderr.strip()[-300:]}"
        return {"ok": False, "version": None, "reason": reason}
    return {"ok": True, "version": out.stdout.strip(), "reason": None}


def ensure(names: list[str]) -> dict[str, dict[str, Any]]:
    """Install what is missing; report {name: {ok, version, reason}} (also cached to
    bench/.cache/install.json)."""
    report: dict[str, dict[str, Any]] = {}
    with _locked():
        py_reason = _python_incumbents() if {"supervisord", "circus"} & set(names) else None
        npm_reason = _pm2() if "pm2" in names else None
    for name in names:
        if name == "gosup":
            report[name] = _gosup()
        elif name in ("supervisord", "circus"):
            binary = venv_bin("supervisord" if name == "supervisord" else "circusd")
            ok = binary.exists()
            version = _py_version("supervisor" if name == "supervisord" else "circus")
            reason = None if ok else (py_reason or f"{binary} missing after install")
            report[name] = {"ok": ok, "version": version if ok else None, "reason": reason}
        elif name == "pm2":
            report[name] = _pm2_report(npm_reason)
    common.CACHE.mkdir(parents=True, exist_ok=True)
    (common.CACHE / "install.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _pm2_report(reason: str | None) -> dict[str, Any]:
    # The version comes from package.json: running `pm2 --version` would spawn
    # a pm2 daemon in ~/.pm2 as a side effect.
    pkg = NPM / "node_modules" / "pm2" / "package.json"
    if not pm2_bin().exists() or not pkg.exists():
        return {"ok": False, "version": None, "reason": reason or "pm2 missing after npm install"}
    node = shutil.which("node")
    version = json.loads(pkg.read_text()).get("version")
    node_version = None
    if node:
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            node_version = subprocess.run(
                [node, "--version"], capture_output=True, text=True, timeout=30
            ).stdout.strip()
    label = f"{version} (node {node_version})" if node_version else version
    return {"ok": True, "version": label, "reason": None}


def py_spy() -> Path | None:
    path = venv_bin("py-spy")
    return path if path.exists() and os.access(path, os.X_OK) else None
