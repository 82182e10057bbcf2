"""An idle gosup carries only what its configuration uses (issue 18, RSS):
no ssl/libssl unless a URL is https (core/tls.py), no h11 unless a URL is
named, no tenacity before a run fails, no html without the status page. And
an https probe still works, in a daemon that started without ssl and loads
it late, against a real TLS server on 127.0.0.1 with a certificate made here.

Real gosup, real Go children, a real TLS handshake; every wait has a deadline.
What it saves is measured in bench/overhead.py.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Gosup, self_signed_cert, wait_for

# Top-level modules an idle plain gosup must not import. ssl is checked in
# /proc/PID/maps (libssl, _ssl): importtime also logs asyncio's attempts that
# core/tls.py turns away.
LAZY = ("h11", "tenacity", "html")


def _program(goapp: Path, name: str, extra: str = "") -> str:
    argv = json.dumps([str(goapp), "-name", name])
    return f'[programs.{name}]\ncommand = {argv}\nstart_seconds = "100ms"\n{extra}\n'


def _https_ready(goapp: Path, name: str, port: int) -> str:
    return _program(
        goapp,
        name,
        f'\n[programs.{name}.ready]\nhttp = "https://127.0.0.1:{port}/readyz"\n'
        'interval = "100ms"\ntimeout = "5s"\nwithin = "30s"\n',
    )


def _imported(g: Gosup) -> set[str]:
    """Top-level modules gosup imported (PYTHONPROFILEIMPORTTIME's lines on its stderr)."""
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in g.log().splitlines()
        if line.startswith("import time:")
    }


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, http.server.ThreadingHTTPServer]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for that
    address: (port, the certificate to trust, the server)."""
    cert, key = self_signed_cert(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits = 0  # type: ignore[attr-defined]
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="tls-server")
    thread.start()
    try:
        yield server.server_address[1], cert, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_plain_daemon_loads_no_ssl_and_https_works_once_added(
    gosup_factory: Any, goapp: Path, tls_server: tuple[int, Path, Any]
) -> None:
    port, cert, server = tls_server
    g = gosup_factory(_program(goapp, "plain"))
    g.start({"PYTHONPROFILEIMPORTTIME": "1", "SSL_CERT_FILE": str(cert)})
    g.running_pid("plain")
    assert g.cli("status").returncode == 0
    maps = _maps(g.pid)
    assert "libssl" not in maps and "_ssl." not in maps, "libssl loaded without an https target"
    assert not _imported(g) & set(LAZY), "imported without a use in app.toml"

    # An https probe added by a reload: ssl comes in now, after asyncio
    # started without it, and asyncio's TLS transport works with it.
    g.config.write_text(_program(goapp, "plain") + "\n" + _https_ready(goapp, "secure", port))
    reload = g.cli("reload")
    assert reload.returncode == 0, reload.stderr
    g.running_pid("secure", timeout=40)
    assert server.hits >= 1
    assert not g.history("secure", "probe_failed"), g.history("secure", "probe_failed")
    assert "libssl" in _maps(g.pid)
    assert "h11" in _imported(g)
    assert g.stop() == 0


def test_https_named_at_start_is_checked_and_probed(
    gosup_factory: Any, goapp: Path, tls_server: tuple[int, Path, Any]
) -> None:
    port, cert, server = tls_server
    g = gosup_factory(_https_ready(goapp, "secure", port))
    check = g.cli("check", str(g.config))
    assert check.returncode == 0, check.stderr
    g.start({"SSL_CERT_FILE": str(cert)})
    g.running_pid("secure", timeout=40)
    assert server.hits >= 1
    assert "libssl" in _maps(g.pid)
    assert g.stop() == 0


def test_an_untrusted_certificate_fails_the_probe(
    gosup_factory: Any, goapp: Path, tls_server: tuple[int, Path, Any]
) -> None:
    """Loading ssl late keeps verification on: a certificate nobody vouches for
    is a failed probe (named), never a pass."""
    port, _cert, _server = tls_server
    config = _https_ready(goapp, "secure", port).replace('within = "30s"', 'within = "1s"')
    g = gosup_factory(config)
    g.start({"SSL_CERT_FILE": "/nonexistent"})
    failed = g.wait_event("probe_failed", "secure", timeout=30)
    assert "certificate" in failed[0]["error"].lower(), failed[0]
    wait_for(lambda: g.history("secure", "exited"), 30, "the not-ready start ends")
    assert g.stop() == 0
