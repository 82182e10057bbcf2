"""Review of the runtime side (sampler, Go HTTP client, reaper, sd_notify,
metrics endpoint): each test pins a bug that was found and fixed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from conftest import wait_for
from test_resources import free_port, goroutine_leak, leak_restarted, sampled

from supervisor.config import BuildSpec
from supervisor.health import evidence, gohttp
from supervisor.service import builder, metrics, orphans, systemd
from supervisor.service.daemon import Supervisor

# -- gohttp ----------------------------------------------------------------------------


async def _serve_on_one_connection(answers: list[bytes]) -> tuple[list[bytes], int]:
    """GET each answer in turn through one HttpClient; the bodies, and connections made."""
    connections = 0
    handlers: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        handlers.append(asyncio.current_task())
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            for raw in answers:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(raw)
                await writer.drain()
            await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = gohttp.HttpClient(f"http://127.0.0.1:{port}/")
    try:
        bodies = [(await client.get("/debug/vars", 5.0, 1 << 20)).body for _ in answers]
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
        await asyncio.wait_for(asyncio.gather(*handlers), 10)
    return bodies, connections


def test_a_kept_alive_connection_survives_a_chunked_answer() -> None:
    """Go's net/http answers chunked whenever a handler writes more than 2 KiB
    without a Content-Length (expvar, promhttp): the last-chunk's CRLF was left
    in the buffer and read as the next status line, so every other scrape failed."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    bodies, connections = asyncio.run(_serve_on_one_connection([chunked] * 3))
    assert bodies == [b"abc"] * 3
    assert connections == 1


def test_a_flood_of_headers_is_cut_short() -> None:
    """max_bytes bounds the body; the headers were read without any bound."""
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 100) for i in range(20_000))  # 2 MiB
    raw = b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nok"

    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                writer.write(raw)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(gohttp.ScrapeError, match="headers"):
                await gohttp.http_get(f"http://127.0.0.1:{port}/metrics", 5.0, 100)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


# -- dev mode ------------------------------------------------------------------------


def test_a_source_named_like_the_binary_is_still_a_source(tmp_path: Path) -> None:
    """``go build -o server .`` with main in server.go: every name that began
    with the binary's was dropped, so saving server.go never rebuilt."""
    spec = BuildSpec(command=("go", "build", "-o", "server", "."), directory=tmp_path)
    accept = builder.SourceFilter(spec, never=(), binary=tmp_path / "server")
    assert accept(str(tmp_path / "server.go"))
    assert accept(str(tmp_path / "server_linux.go"))
    assert not accept(str(tmp_path / "server"))
    assert not accept(str(tmp_path / "server-go-tmp-umask"))


# -- leak evidence ---------------------------------------------------------------------


def test_a_leak_is_restarted_even_when_its_evidence_cannot_be_written(
    tmp_path: Path, goapp: Path
) -> None:
    """A full disk or an unusable dumps directory made _act raise before the
    restart; the hysteresis had fired, so the leak then ran on unchecked."""
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "dumps").write_text("a file where the directory should be")
    prog = goroutine_leak(goapp)

    async def main() -> None:
        async with sampled(tmp_path, prog) as h:
            await leak_restarted(h)
            assert [r["reason"] for r in h.history("restart_requested")] == ["leak"]
            assert not h.history("evidence_saved")

    asyncio.run(main())


def test_pruning_skips_what_it_cannot_remove(tmp_path: Path) -> None:
    stuck = tmp_path / "api-20260101T000000.000Z-pprof.txt"
    stuck.mkdir()  # not removable with unlink
    (stuck / "x").write_text("x")
    newer = [tmp_path / f"api-2026010{d}T000000.000Z-pprof.txt" for d in (2, 3)]
    for path in newer:
        path.write_text("dump")
    removed = evidence.prune_dumps(tmp_path, "api", keep=1)
    assert removed == [newer[0]]
    assert newer[1].exists() and stuck.exists()


def test_a_refused_sigquit_restart_saves_no_dump(tmp_path: Path) -> None:
    """When the leak restart was refused (the program was STOPPING), no SIGQUIT
    went out, yet the program's ordinary stderr was saved as "sigquit" evidence."""
    saved: list[Path] = []

    async def on_saved(path: Path) -> None:
        saved.append(path)

    async def main() -> None:
        capture = evidence.SigquitCapture("api", tmp_path / "api-sigquit.txt", 1 << 20, on_saved)
        capture.feed(b"ordinary log line\n")
        ended: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        ended.cancel()  # the restart request came back refused
        if capture.wanted(ended):
            await capture.save()

    asyncio.run(main())
    assert saved == [] and not (tmp_path / "api-sigquit.txt").exists()


# -- the PID 1 reaper ------------------------------------------------------------------


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_reaper_leaves_a_child_that_popen_has_yet_to_wait_for() -> None:
    """A validator that exited while a helper it left still holds its output
    pipe: Popen.communicate waits for EOF before waitpid. Reaping it meanwhile
    made Popen see ECHILD and report exit code 0: a failing check passed."""
    reaper = orphans.Reaper(SimpleNamespace(programs={}))  # type: ignore[arg-type]
    proc = subprocess.Popen(["sh", "-c", "exit 3"])
    try:
        wait_for(lambda: _zombie(proc.pid), 10, "the child to exit")
        reaper.reap_once()
        reaper.reap_once()
        assert reaper.reaped == 0
    finally:
        code = proc.wait(10)
    assert code == 3


def test_reaper_still_reaps_an_orphan() -> None:
    reaper = orphans.Reaper(SimpleNamespace(programs={}))  # type: ignore[arg-type]
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 0"], dict(os.environ))  # no Popen
    try:
        wait_for(lambda: _zombie(pid), 10, "the orphan to exit")
        reaper.reap_once()
        reaper.reap_once()
        assert reaper.reaped == 1 and not psutil.pid_exists(pid)
    finally:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# -- sd_notify -------------------------------------------------------------------------


@pytest.mark.parametrize("usec", ["1", "999"])
def test_a_tiny_watchdog_usec_does_not_spin_the_loop(usec: str) -> None:
    """WATCHDOG_USEC=1 made a call_later(0.0000005) chain: a busy loop of datagrams."""
    interval = systemd.watchdog_interval({"WATCHDOG_USEC": usec})
    assert interval is not None and interval >= systemd.WATCHDOG_MIN_INTERVAL


# -- the /metrics endpoint -------------------------------------------------------------


@pytest.mark.parametrize(
    "accept", ["text/plain; version=abc", "application/openmetrics-text; version=garbage"]
)
def test_metrics_answer_a_malformed_accept_header(tmp_path: Path, accept: str) -> None:
    """prometheus_client's choose_encoder raises TypeError on a version it cannot
    parse: the connection was dropped without an answer."""

    async def main() -> bytes:
        config_text = f'[supervisor]\nstate_dir = "s"\nmetrics_listen = "127.0.0.1:{free_port()}"\n'
        from supervisor import config as configmod

        sup = Supervisor(configmod.loads(config_text, tmp_path / "app.toml"))
        server = metrics.make_service(sup)
        assert server is not None
        await server.start()
        try:
            host, port = metrics.split_listen(server.listen)
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET /metrics HTTP/1.1\r\nAccept: {accept}\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await writer.wait_closed()
            return answer
        finally:
            await server.close()
            sup.history.close()

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"gosup_program_up" in answer
