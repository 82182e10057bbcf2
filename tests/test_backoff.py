"""The restart delay policy: pure, seeded, no sleeping."""

import random

import pytest

from supervisor.config import BackoffSpec
from supervisor.core.backoff import BackoffPolicy


def policy(**kw: float) -> BackoffPolicy:
    spec = BackoffSpec(**{"jitter": 0.0, **kw})  # type: ignore[arg-type]
    return BackoffPolicy(spec, random.Random(7))


def test_exponential_sequence_capped_at_max() -> None:
    p = policy(initial=0.25, multiplier=2.0, max=3.0)
    assert [p.delay(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_other_multiplier() -> None:
    p = policy(initial=0.1, multiplier=3.0, max=100.0)
    assert [round(p.delay(n), 6) for n in range(1, 5)] == [0.1, 0.3, 0.9, 2.7]


def test_no_failures_no_delay() -> None:
    assert policy().delay(0) == 0.0


@pytest.mark.parametrize("failures", [1, 2, 5, 12])
def test_jitter_stays_within_fraction(failures: int) -> None:
    spec = BackoffSpec(initial=1.0, multiplier=2.0, max=8.0, jitter=0.2)
    p = BackoffPolicy(spec, random.Random(failures))
    base = min(1.0 * 2.0 ** (failures - 1), 8.0)
    delays = [p.delay(failures) for _ in range(500)]
    assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
    # and it really spreads (a fleet must not restart in lockstep)
    assert max(delays) - min(delays) > base * 0.2


def test_give_up_after_n_consecutive_failures() -> None:
    p = policy(give_up_after=3)
    assert not p.decide(1).give_up
    assert not p.decide(2).give_up
    assert p.decide(3).give_up


def test_give_up_zero_means_never() -> None:
    p = policy(give_up_after=0, max=1.0)
    assert not any(p.decide(n).give_up for n in range(1, 1000))


def test_healthy_run_resets() -> None:
    p = policy(reset_after=60.0)
    assert p.run_was_healthy(60.0)
    assert not p.run_was_healthy(59.9)
