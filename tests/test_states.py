"""The transition table: every edge of DESIGN §3 is allowed, nothing else is."""

import itertools

import pytest

from supervisor.core.states import TRANSITIONS, ProcessState, TransitionError, check_transition

S = ProcessState

# The diagram of DESIGN §3, plus the operator's edges out of settled states.
EXPECTED = {
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.RUNNING),
    (S.STARTING, S.EXITED),
    (S.STARTING, S.STOPPING),
    (S.RUNNING, S.STOPPING),
    (S.RUNNING, S.EXITED),
    (S.RUNNING, S.STARTING),  # an overlap restart: the replacement starts, the old one serves
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.EXITED),
    (S.EXITED, S.BACKOFF),
    (S.EXITED, S.STARTING),
    (S.EXITED, S.FATAL),
    (S.EXITED, S.STOPPED),
    (S.BACKOFF, S.STARTING),
    (S.BACKOFF, S.STOPPED),
    (S.FATAL, S.STARTING),
    (S.FATAL, S.STOPPED),
}


def test_table_is_exactly_the_design() -> None:
    actual = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert actual == EXPECTED


@pytest.mark.parametrize(("old", "new"), sorted(EXPECTED, key=str))
def test_allowed_edges_pass(old: ProcessState, new: ProcessState) -> None:
    check_transition(old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [(a, b) for a, b in itertools.product(S, S) if (a, b) not in EXPECTED],
)
def test_other_edges_raise(old: ProcessState, new: ProcessState) -> None:
    with pytest.raises(TransitionError, match=f"{old.value} -> {new.value}"):
        check_transition(old, new)


def test_fatal_is_left_only_by_an_operator() -> None:
    # FATAL never leads back to BACKOFF or RUNNING by itself.
    assert TRANSITIONS[S.FATAL] == {S.STARTING, S.STOPPED}
