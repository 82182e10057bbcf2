"""The operator docs say what the code does (issues 16 and 17): greps for the
statements an admin relies on, the links between pages, the tests that
docs/security.md cites, and the wheel that docs/production.md builds.

A grep is the cheapest honest check for prose: it breaks when a statement is
dropped or contradicted by an old sentence coming back.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from supervisor.files import configswap

DOCS = ROOT / "docs"


def text(name: str) -> str:
    return (ROOT / name).read_text()


def test_production_walks_a_debian_admin_through_the_install() -> None:
    doc = text("docs/production.md")
    for statement in (
        "Python 3.11 or later is required",
        "Debian 12 (bookworm) ships 3.11",
        "Debian 11 (bullseye, 3.9)",
        "pip wheel --no-deps . -w dist",
        "pip install dist/gosup-*.whl",
        "systemctl disable --now prometheus prometheus-node-exporter caddy",
        "systemctl mask prometheus prometheus-node-exporter caddy",
        "ReadWritePaths=/etc/caddy",
        "ProtectSystem=full",
        "`UMask=0027`",
        'capabilities = ["CAP_NET_BIND_SERVICE"]',
        "gosup logs api",
    ):
        assert statement in doc, statement


def test_non_root_user_switch_is_described_alike_everywhere() -> None:
    """production.md once said it fails at start; the code makes it a config error at run."""
    production, config = text("docs/production.md"), text("docs/config.md")
    assert "as a config error (exit 2)" in production
    assert "is a config error at `run`" in config
    assert "fails to start with an `exited` record" not in production
    spawn = text("supervisor/core/spawn.py")
    assert "gosup is not root" in spawn and "gosup is not root" in production


def test_the_units_set_a_umask_and_name_the_staging_paths() -> None:
    for unit in ("systemd/gosup.service", "systemd/gosup@.service"):
        body = text(unit)
        assert "\nUMask=0027\n" in body, unit
        assert "ReadWritePaths=-/etc/gosup" in body and "docs/production.md" in body


def test_the_python_requirement_is_where_an_admin_looks() -> None:
    assert "Debian 11" in text("README.md")
    assert 'requires-python = ">=3.11"' in text("pyproject.toml")


def test_refusal_reasons_and_limits_are_documented() -> None:
    for doc in ("docs/history.md", "docs/config-files.md", "docs/security.md"):
        body = text(doc)
        for reason in ("not_a_regular_file", "too_large", "unreadable"):
            assert reason in body, (doc, reason)
    assert configswap.STAGED_MAX == 1 << 30 and configswap.SIDECAR_MAX == 1024
    for doc in ("docs/config-files.md", "docs/security.md"):
        assert "1 GiB" in text(doc) and "1 KiB" in text(doc), doc


def test_every_relative_link_resolves() -> None:
    pages = [ROOT / "README.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_security_cites_tests_that_exist() -> None:
    doc = text("docs/security.md")
    # "`::name`" alone continues the file cited before it (in document order)
    cited = re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", doc)
    cited = [(path, name) for path, name in cited if path or name]
    assert len(cited) >= 15
    last = ""
    for path, name in cited:
        last = path or last
        source = (ROOT / last).read_text()
        assert not name or f"def {name}(" in source, f"{last}::{name}"
    for reserved in ("## Leftover processes", "## Metrics port and status page"):
        assert reserved in doc


def _gosup_help(*argv: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "supervisor", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())


def test_help_says_what_the_docs_say() -> None:
    assert "relative to the config file's directory" in _gosup_help("stage")
    logs = _gosup_help("logs")
    for option in ("-f", "-n N", "--stdout", "--stderr", "--raw", "escaped"):
        assert option in logs
    assert "141" in _gosup_help()


def test_the_wheel_builds(tmp_path: Path) -> None:
    """docs/production.md step 1, in a copy of the source (pip writes build/ there)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "supervisor", src / "supervisor", ignore=shutil.ignore_patterns("__pycache__")
    )
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", ".", "-w", str(tmp_path / "dist")],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and re.search(
        r"No matching distribution|Network|connection", r.stderr, re.I
    ):
        pytest.skip("the build backend (setuptools) cannot be fetched here: no package index")
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("gosup-*-py3-none-any.whl"))
    assert len(wheels) == 1, r.stdout
    import zipfile

    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "supervisor/gosup.py" in names and "supervisor/cli/logs.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gosup = supervisor.gosup:main" in zipfile.ZipFile(wheels[0]).read(entry).decode()
