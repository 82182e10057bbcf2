"""The restart delay policy, built on tenacity's wait strategies.

Pure and clock-free: the caller says which consecutive failure this is and
how long the last run lasted; the policy answers how long to wait, or that it
is time to give up. ``Program`` owns the counting, this module only the maths,
so the whole policy is unit-tested without sleeping.

tenacity is imported at the first failed run, not with this module: a
daemon whose programs do not fail never needs it, and it is about 0.7 MiB of
an idle gosup's RSS. The first delay (``initial``, 250 ms by default) hides
the few milliseconds the import takes, once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from supervisor.config import BackoffSpec

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    from tenacity.wait import wait_base


@dataclass(frozen=True)
class Decision:
    delay: float  # seconds to wait before the next start (0 = at once)
    give_up: bool  # the give-up limit is reached: go FATAL


class BackoffPolicy:
    """Delay for the n-th consecutive failure: initial * multiplier**(n-1), capped, jittered."""

    def __init__(self, spec: BackoffSpec, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._rng = rng or random.Random()
        self._wait: wait_base | None = None  # tenacity's strategy, made at the first failure

    def delay(self, failures: int) -> float:
        """Delay before restart number ``failures`` (1 = first consecutive failure)."""
        if failures <= 0:
            return 0.0
        from tenacity import RetryCallState, wait_exponential

        if self._wait is None:
            spec = self.spec
            self._wait = wait_exponential(
                multiplier=spec.initial, exp_base=spec.multiplier, max=spec.max
            )
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = failures
        base = min(self._wait(state), self.spec.max)
        spread = base * self.spec.jitter
        return max(0.0, base + self._rng.uniform(-spread, spread))

    def decide(self, failures: int) -> Decision:
        """What to do after ``failures`` consecutive failed runs."""
        limit = self.spec.give_up_after
        if limit and failures >= limit:
            return Decision(delay=0.0, give_up=True)
        return Decision(delay=self.delay(failures), give_up=False)

    def run_was_healthy(self, uptime: float) -> bool:
        """A run that lasted reset_after resets the failure count (and restarts at once)."""
        return uptime >= self.spec.reset_after
