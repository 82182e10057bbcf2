"""Program states and the transitions allowed between them (stdlib only).

The table is the single source of truth: ``Program._transition`` refuses any
edge that is not listed here, so an impossible state change is a loud bug
rather than a silently confused supervisor.
"""

from __future__ import annotations

import enum


class ProcessState(enum.Enum):
    STOPPED = "STOPPED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    EXITED = "EXITED"
    FATAL = "FATAL"


S = ProcessState

TRANSITIONS: dict[ProcessState, frozenset[ProcessState]] = {
    # STOPPED -> STARTING: autostart, operator start
    S.STOPPED: frozenset({S.STARTING}),
    # STARTING -> RUNNING: stayed up start_seconds
    # STARTING -> EXITED: the spawn failed, or the child died before start_seconds
    # STARTING -> STOPPING: stop requested while starting
    S.STARTING: frozenset({S.RUNNING, S.STOPPING, S.EXITED}),
    # RUNNING -> EXITED: the child exited on its own
    # RUNNING -> STOPPING: stop or restart requested
    # RUNNING -> STARTING: an overlap restart: the replacement starts while the
    #   old process keeps serving (STARTING -> RUNNING: it took over, or it
    #   failed and the old process, never stopped, runs on)
    S.RUNNING: frozenset({S.EXITED, S.STOPPING, S.STARTING}),
    # EXITED -> STARTING: an operator's start after the program exited for good
    # EXITED -> BACKOFF: restart after a delay
    # EXITED -> STOPPED: an operator's stop after the program exited for good
    # EXITED -> FATAL: too many consecutive failures
    # (restart policy says no: the program stays EXITED)
    S.EXITED: frozenset({S.STARTING, S.BACKOFF, S.STOPPED, S.FATAL}),
    # BACKOFF -> STARTING: the delay is over, or an operator's start
    # BACKOFF -> STOPPED: stop requested while waiting
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED}),
    # STOPPING -> STOPPED: the child is gone (and its whole tree)
    # STOPPING -> EXITED: gosup stopped a run that failed (not ready within
    #   ready.within; a leak or unhealthy restart within backoff.reset_after)
    S.STOPPING: frozenset({S.STOPPED, S.EXITED}),
    # FATAL -> STARTING: only an operator's start leaves FATAL
    # FATAL -> STOPPED: an operator's stop (or the program removed by a reload)
    S.FATAL: frozenset({S.STARTING, S.STOPPED}),
}

# States in which a child process exists and may be signalled.
SIGNALLABLE_STATES = frozenset({S.STARTING, S.RUNNING, S.STOPPING})
# States in which the program counts as "up" for READY=1 and metrics.
RUNNING_STATES = frozenset({S.RUNNING})

STATE_NUMBERS = {state: number for number, state in enumerate(ProcessState)}


class TransitionError(RuntimeError):
    """An edge that the table does not allow: a bug in the caller."""


def check_transition(old: ProcessState, new: ProcessState) -> None:
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"illegal transition {old.value} -> {new.value}")
