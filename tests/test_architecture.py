"""The house keeps its shape: scripts/imports.py finds no circle and no arrow
pointing the wrong way in the package, and it does fail when one appears
(checked on copies of the package and on small synthetic ones)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPT = ROOT / "scripts" / "imports.py"
PACKAGE = ROOT / "supervisor"


def imports(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "scripts.imports"] if module else [sys.executable, str(SCRIPT)]
    return subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_package_has_no_circle_and_no_upward_arrow() -> None:
    run = imports()
    assert run.returncode == 0, run.stderr
    assert "circle:" not in run.stderr and "forbidden:" not in run.stderr
    for heading in ("(top level)", "config/", "core/", "health/", "files/", "service/", "cli/"):
        assert f"\n{heading}\n" in run.stdout
    assert "  core.program " in run.stdout


def test_it_runs_as_a_module_too() -> None:
    run = imports("-q", module=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "supervisor"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


UPWARD = {
    "at module level": "from supervisor.service import daemon\n",
    "in a function": "def _f() -> None:\n    from supervisor.service import daemon  # noqa\n",
    "for types only": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
    "    from supervisor.service import daemon\n",
    "relative": "from ..service import daemon\n",
}


@pytest.mark.parametrize("how", UPWARD)
def test_core_importing_the_service_fails_the_check(tmp_path: Path, how: str) -> None:
    copy = _copy(tmp_path)
    with open(copy / "core" / "backoff.py", "a") as f:
        f.write("\n" + UPWARD[how])
    run = imports(str(copy))
    assert run.returncode == 1
    assert "forbidden: core.backoff:" in run.stderr
    assert "-> service.daemon: upward arrow: core may import" in run.stderr
    # service.daemon imports core (through core.program, core.spawn ...): a circle too
    assert "circle:" in run.stderr and "service.daemon" in run.stderr


def _package(root: Path, files: dict[str, str]) -> Path:
    """A synthetic package named ``supervisor`` with every folder and ``files`` added."""
    pkg = root / "supervisor"
    for folder in ("config", "core", "health", "files", "service", "cli"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    for name in ("__init__.py", "protocol.py", "history.py", "cli/client.py", "cli/__main__.py"):
        (pkg / name).write_text("")
    for name, text in files.items():
        (pkg / name).write_text(textwrap.dedent(text))
    return pkg


BROKEN = {
    "sideways": (
        {"health/probe.py": "from supervisor.files import watch\n", "files/watch.py": ""},
        "health.probe:1 -> files.watch: sideways arrow: health may import",
    ),
    "cli into core": (
        {"cli/client.py": "def f():\n    from supervisor.core import spawn\n", "core/spawn.py": ""},
        "cli.client:2 -> core.spawn: upward arrow: cli may import",
    ),
    "config into history": (
        {"config/app.py": "from supervisor import history\n"},
        "config.app:1 -> history: ",
    ),
    "third party in config": (
        {"config/app.py": "import psutil\n"},
        "config.app:1 -> psutil: config imports the stdlib only",
    ),
    "asyncio on the status path": (
        {"cli/client.py": "from supervisor.cli import table\n", "cli/table.py": "import asyncio\n"},
        "cli.table:1 -> asyncio: loaded on the `gosup status` path",
    ),
    "a module in no folder": (
        {"util.py": "", "core/a.py": "from supervisor import util\n"},
        "util is in no layer",
    ),
    "no such module": (
        {"core/a.py": "from supervisor.core.nothere import x\n"},
        "core.a:1 -> ?core.nothere: no such module",
    ),
    "a circle in one folder": (
        {"core/a.py": "from supervisor.core import b\n", "core/b.py": "from . import a\n"},
        "circle: core.a <-> core.b",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_each_rule_is_checked(tmp_path: Path, case: str) -> None:
    files, message = BROKEN[case]
    run = imports(str(_package(tmp_path, files)))
    assert run.returncode == 1, run.stdout
    assert message in run.stderr


def test_a_clean_synthetic_package_passes(tmp_path: Path) -> None:
    files = {
        "config/app.py": "from supervisor import protocol\nimport tomllib\n",
        "core/program.py": "from supervisor.config import app\nfrom supervisor import history\n",
        "health/probe.py": "from supervisor.core import program\nimport psutil\n",
        "files/sync.py": "from ..core import program\n",
        "service/daemon.py": "import asyncio\nfrom supervisor.health import probe\n"
        "from supervisor.files import sync\n",
        "cli/client.py": "import json\nfrom supervisor.cli import common\n",
        "cli/common.py": "from supervisor import protocol\n"
        "def f():\n    from supervisor import config\n",
    }
    run = imports(str(_package(tmp_path, files)))
    assert run.returncode == 0, run.stderr
    assert "  files.sync             -> core.program\n" in run.stdout
    assert "  cli.common             -> ~config, protocol\n" in run.stdout


def test_not_a_package_is_a_usage_error(tmp_path: Path) -> None:
    run = imports(str(tmp_path))
    assert run.returncode == 2
    assert "is not a package" in run.stderr
