"""The status page (issue 17.6): ``[supervisor] status_page = true`` serves a
read-only HTML page at ``/`` on ``metrics_listen``.

A real gosup with a program that gets ready and one that crash-loops with
HTML and a terminal escape in its last words: read over HTTP (content,
escaping, headers) and in a real browser (headless Chromium, where it is
installed: a screenshot that is not blank, and the DOM Chromium built).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import Gosup, free_port, wait_for

from supervisor.config import ConfigError, loads

EVIL = "<script>alert(1)</script> & \x1b]0;pwned\x07"


def config(goapp: Path, port: int, app_port: int, page: bool = True) -> str:
    crash = json.dumps([str(goapp), "-mode", "exit", "-fail-start", EVIL])
    return f"""
        [supervisor]
        metrics_listen = "127.0.0.1:{port}"
        status_page = {"true" if page else "false"}

        [programs.api]
        command = ["{goapp}", "-http", "127.0.0.1:{app_port}"]

        [programs.api.ready]
        http = "http://127.0.0.1:{app_port}/readyz"
        interval = "100ms"

        [programs.crashy]
        command = {crash}
        start_seconds = "100ms"

        [programs.crashy.backoff]
        initial = "100ms"
        max = "200ms"
        give_up_after = 0
    """


def get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.fixture
def served(gosup_factory: Any, goapp: Path) -> tuple[Gosup, str]:
    port = free_port()
    g = gosup_factory(config(goapp, port, free_port())).start()
    g.running_pid("api")
    g.wait_event("backoff", "crashy", count=2)
    return g, f"http://127.0.0.1:{port}"


def test_the_page_shows_every_program_escaped(served: tuple[Gosup, str]) -> None:
    g, base = served
    status, headers, page = get(base + "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script
    assert page.startswith("<!DOCTYPE html>")
    for text in ("api", "crashy", "RUNNING", "<svg", "Restarts, last 24 hours", "failed run"):
        assert text in page, text
    # The crash's last words, escaped: no tag, no raw terminal escape.
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; \\x1b]0;pwned\\x07" in page
    assert "<script" not in page and "\x1b" not in page
    # Readiness: api has a [ready] probe and passed it; crashy has none (blank).
    assert "<th>Ready</th>" in page and "<td>ready</td>" in page
    # The restart marks come from the history records.
    backoffs = len(g.history("crashy", "backoff"))
    assert backoffs >= 2 and page.count("crashy ") >= 1
    assert "http" not in page.split("<style>")[1].split("</style>")[0]  # no external assets
    assert "<form" not in page and "<button" not in page  # read-only
    assert get(base + "/metrics")[0] == 200
    status, _, body = get(base + "/nope")
    assert status == 404 and "/metrics and /" in body
    assert g.stop() == 0


def test_off_by_default_and_needs_metrics_listen(gosup_factory: Any, goapp: Path) -> None:
    port = free_port()
    g = gosup_factory(config(goapp, port, free_port(), page=False)).start()
    g.running_pid("api")
    assert get(f"http://127.0.0.1:{port}/")[0] == 404
    assert g.stop() == 0
    with pytest.raises(ConfigError, match=r"supervisor.status_page: needs metrics_listen"):
        loads("[supervisor]\nstatus_page = true\n", "/tmp/app.toml")


def test_the_timeline_keeps_restarts_from_before_gosup_started(
    gosup_factory: Any, goapp: Path
) -> None:
    """The history of the last 24 hours is read at start: a restarted gosup
    still shows the crash loop of the one before (crashy does not run now)."""
    port = free_port()
    g = gosup_factory(config(goapp, port, free_port())).start()
    g.wait_event("backoff", "crashy", count=2)
    assert g.stop() == 0
    text = g.config.read_text()
    g.config.write_text(text.replace('start_seconds = "100ms"', "autostart = false"))
    g.start()
    g.wait_event("supervisor_started", count=2)

    def marks() -> int:
        return get(f"http://127.0.0.1:{port}/")[2].count("<title>crashy ")

    assert wait_for(marks, 10, "crashy's restarts on the new gosup's page")
    assert g.stop() == 0


# -- a real browser ------------------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium here (Debian: apt-get install chromium); the HTTP tests still run")


def _browser(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    argv += [f"--user-data-dir={cwd / 'chromium-profile'}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd)


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """(width, height, the decompressed scanlines) of a PNG, with the stdlib only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_chromium_renders_the_page(served: tuple[Gosup, str], tmp_path: Path) -> None:
    g, base = served
    shot = tmp_path / "status.png"
    blank = tmp_path / "blank.png"
    size = "--window-size=1280,900"
    result = _browser(f"--screenshot={shot}", size, base + "/", cwd=tmp_path)
    assert shot.exists(), result.stderr[-2000:]
    _browser(f"--screenshot={blank}", size, "about:blank", cwd=tmp_path)
    width, height, pixels = _png_pixels(shot)
    assert (width, height) == (1280, 900)
    # Not blank: a white page is a few distinct (filtered) byte values and
    # compresses to almost nothing; a table, text and a timeline are not.
    assert len(set(pixels)) > 32
    if blank.exists():
        assert shot.stat().st_size > 3 * blank.stat().st_size
    # The DOM Chromium built from the page: every program is there, as text.
    dom = _browser("--dump-dom", base + "/", cwd=tmp_path).stdout
    assert "crashy" in dom and ">api<" in dom and "<svg" in dom
    assert "<script" not in dom
    if keep := os.environ.get("GOSUP_TEST_SCREENSHOT"):  # for a person to look at
        shutil.copy(shot, keep)
    assert g.stop() == 0
