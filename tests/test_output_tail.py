"""A run's exit ``output_tail`` is that run's own stderr (issue 18).

During an overlap restart the old process and its replacement write at the
same time; the old one's last words (what it says when it is stopped) used to
land in the one stderr tail the program kept, so a replacement that failed
later, silently, was reported with the old process's goodbye as its own.
"""

from __future__ import annotations

from typing import Any

from conftest import wait_for

# sh: the first run serves and says goodbye on stderr when stopped; every later
# run waits for that goodbye to be written, then fails without a word.
SCRIPT = (
    "if [ ! -e first ]; then touch first; "
    "trap 'echo old run says goodbye >&2; touch goodbye; exit 0' TERM; "
    "while :; do sleep 0.05; done; fi; "
    "while [ ! -e goodbye ]; do sleep 0.05; done; sleep 0.3; exit 3"
)


def test_replacement_exit_tail_is_its_own_not_the_old_run(gosup_factory: Any) -> None:
    g = gosup_factory(f"""
        [programs.api]
        command = ["sh", "-c", "{SCRIPT}"]
        restart_mode = "overlap"
        restart = "never"
        start_seconds = "200ms"
        stop_timeout = "5s"
    """).start()
    old = g.running_pid("api")
    result = g.cli("restart", "api", "-c", str(g.config))
    assert result.returncode == 0, result
    stopped = g.wait_event("stopped", "api", where=lambda r: r["pid"] == old)
    assert stopped
    log = g.log_dir / "api.stderr.log"
    wait_for(lambda: "goodbye" in log.read_text(), what="the old run's goodbye in the log")
    exits = g.wait_event("exited", "api", where=lambda r: r.get("exit_code") == 3)
    assert "goodbye" not in exits[-1].get("output_tail", ""), exits[-1]
    old_exit = [r for r in g.history("api", "exited") if r["pid"] == old]
    assert old_exit and old_exit[0]["exit_code"] == 0
    assert g.stop() == 0
