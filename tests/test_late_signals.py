"""A signal that arrives while gosup closes (every program already stopped)
changes nothing: gosup still writes ``supervisor_stopped`` and exits 0.

Found as a flaky ``test_actor_reliability[two SIGINTs]``: the second SIGINT
landed after the loop had handed SIGINT back to Python's default
(KeyboardInterrupt, exit 130) and before gosup had exited. SIGTERM then had
its default action (gosup killed, exit -15, no ``supervisor_stopped``); so
had SIGHUP. ``service/signals.py`` ignores them from then on instead."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stop_signals_while_gosup_closes_change_nothing(
    gosup_factory: Any, goapp: Path, sig: signal.Signals
) -> None:
    g = gosup_factory(f"""
        [programs.api]
        command = ["{goapp}", "-mode", "serve"]
        start_seconds = "100ms"
    """).start()
    g.running_pid("api")
    assert g.proc is not None
    g.proc.send_signal(signal.SIGTERM)
    # The same signal again and again until gosup is gone, so that some land
    # in the close, once every program has stopped. (A second SIGINT
    # before that kills the programs at once: a stop all the same.)
    deadline = time.monotonic() + 60
    while g.proc.poll() is None and time.monotonic() < deadline:
        g.proc.send_signal(sig)
        time.sleep(0.0005)  # pacing of the signals, not a wait for a condition
    assert g.proc.wait(30) == 0, g.log()[-3000:]
    assert g.history(event="supervisor_stopped"), "the close was cut short"


def test_only_the_router_takes_the_wakeup_fd() -> None:
    """The interpreter has one wakeup fd: asyncio's ``add_signal_handler``
    (or another ``set_wakeup_fd``) anywhere else in gosup would take it from
    ``service/signals.py``, and a signal landing in another thread would
    then wait for the loop's next timer."""
    root = Path(__file__).resolve().parent.parent / "supervisor"
    takers = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if path.name != "signals.py"
        and any(word in path.read_text() for word in ("add_signal_handler(", "set_wakeup_fd("))
    ]
    assert not takers
