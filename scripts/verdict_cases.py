#!/usr/bin/env python3
"""The cases of issue 13 against a gosup tree: what `gosup stage` says and exits.

    PYTHONPATH=/path/to/tree .venv/bin/python scripts/verdict_cases.py

For each case: a real gosup (`python -m supervisor run`, from PYTHONPATH)
runs the goapp fixture, a new version is staged with `gosup stage`, and the
script prints the command's last line, its exit code, how long it took, and
the config_* records the history holds about the version. Run it on an old
tree and on a new one to compare. Needs Go (tests/gobuild.py finds it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import gobuild  # noqa: E402

LAUNCHER = """package main
import ("fmt"; "os"; "strings"; "syscall")
var target, flags, version string
func main() {
	if len(os.Args) > 1 && os.Args[1] == "-version" { fmt.Println(version); return }
	argv := append(append([]string{target}, strings.Split(flags, "|")...), os.Args[1:]...)
	fmt.Fprintln(os.Stderr, syscall.Exec(target, argv, os.Environ()))
	os.Exit(127)
}
"""


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_case(goapp: Path, on_change: str, extra: str = "") -> str:
    p = port()
    return textwrap.dedent(f"""\
        [programs.api]
        command = ["{goapp}", "-config", "config/app.conf", "-http", "127.0.0.1:{p}"]
        start_seconds = "200ms"
        {extra}
        [programs.api.limits]
        go_metrics = "http://127.0.0.1:{p}/metrics"
        [[programs.api.config_files]]
        path = "config/app.conf"
        validate = ["{goapp}", "-check-config", "{{file}}"]
        on_change = "{on_change}"
        probation = "2s"
        """)


CONFIRM = 'confirm = { metric = "goapp_config_last_reload_successful == 1" }\n'


def binary_case(p: int) -> str:
    return textwrap.dedent(f"""\
        [programs.api]
        command = ["bin/api", "-http", "127.0.0.1:{p}"]
        start_seconds = "200ms"
        [programs.api.ready]
        http = "http://127.0.0.1:{p}/readyz"
        within = "2s"
        [programs.api.live]
        http = "http://127.0.0.1:{p}/healthz"
        interval = "200ms"
        timeout = "300ms"
        failures = 2
        [[programs.api.config_files]]
        path = "bin/api"
        on_change = "restart"
        validate = ["{{file}}", "-version"]
        probation = "2s"
        """)


def run_case(name: str, toml: str, live: str, old: bytes, new: bytes, args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "app.toml").write_text(toml)
        path = d / live
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(old)
        path.chmod(0o755)
        env = dict(os.environ)
        py = [sys.executable, "-m", "supervisor"]
        gosup = subprocess.Popen([*py, "run"], cwd=d, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            hist = d / ".gosup" / "history.jsonl"
            deadline = time.monotonic() + 30
            while b'"running"' not in (hist.read_bytes() if hist.exists() else b""):
                if time.monotonic() > deadline or gosup.poll() is not None:
                    print(f"{name}: gosup did not start")
                    return
                time.sleep(0.05)
            (d / "incoming").write_bytes(new)
            (d / "incoming").chmod(0o755)
            began = time.monotonic()
            out = subprocess.run([*py, "stage", *args, "incoming", live], cwd=d, env=env,
                                 capture_output=True, text=True)  # fmt: skip
            took = time.monotonic() - began
            time.sleep(3)  # what happens after the command returned
            said = (out.stdout + out.stderr).strip().splitlines()
            recs = [json.loads(line) for line in hist.read_text().splitlines()]
            events = [
                f"{r['event']}({r.get('reason', '')})" if "reason" in r else r["event"]
                for r in recs
                if r["event"].startswith("config_")
            ]
            print(f"{name}:\n  stage exit {out.returncode} in {took:.1f}s: {said[:2]}")
            print(f"  history: {events}; live file is the new version: {path.read_bytes() == new}")
        finally:
            gosup.terminate()
            gosup.wait(30)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir = Path(tmp)
        goapp = gobuild.build(ROOT / "tests" / "fixtures" / "goapp", bin_dir / "goapp")
        src = bin_dir / "launcher"
        src.mkdir()
        (src / "go.mod").write_text("module launcher\n\ngo 1.22\n")
        (src / "main.go").write_text(LAUNCHER)
        builds = {}
        for name, flags in {"v1": "-version|1", "crash": "-fail-start|boom",
                            "unready": "-never-ready", "hang": "-hang-after|300ms",
                            "v2": "-version|2"}.items():  # fmt: skip
            out = bin_dir / name
            ldflags = f"-X main.target={goapp} -X 'main.flags={flags}' -X main.version={name}"
            cmd = [gobuild.go_binary(), "build", "-ldflags", ldflags, "-o", str(out), "."]
            subprocess.run(cmd, cwd=src, env=gobuild.build_env(), check=True)
            builds[name] = out.read_bytes()
        v1, refuse = b"version 1\n", b"version 2\nrefuse\n"
        conf = "config/app.conf"
        run_case("1. refused on SIGHUP reload (prometheus)",
                 config_case(goapp, "reload", ""), conf, v1, refuse, [])  # fmt: skip
        confirmed = config_case(goapp, "reload").replace("probation", CONFIRM + "probation")
        run_case("1b. the same with confirm = metric", confirmed, conf, v1, refuse, [])
        run_case("2. refused, on_change = restart, --wait 25",
                 config_case(goapp, "restart"), conf, v1, refuse, ["--wait", "25"])  # fmt: skip
        reload_cmd = f'reload_command = ["{goapp}", "-reload", "{{pid}}"]'
        run_case("3. reload_command refuses (caddy reload)",
                 config_case(goapp, "reload", reload_cmd), conf, v1, refuse, [])  # fmt: skip
        for name in ("crash", "unready", "hang", "v2"):
            run_case(f"4. binary deploy: {name}", binary_case(port()), "bin/api",
                     builds["v1"], builds[name], [])  # fmt: skip


if __name__ == "__main__":
    main()
