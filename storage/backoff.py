"""The delay schedule between retries while PostgreSQL is unavailable.

Capped exponential backoff with full jitter: attempt n waits a uniform random time in
[0, min(MAX_DELAY, INITIAL_DELAY * DELAY_BACKOFF ** n)], so workers that lost the
database together do not all come back at the same instant.
"""

import random

INITIAL_DELAY = 0.05
DELAY_BACKOFF = 2.0
MAX_EXPONENT = 30


class Backoff:
    """Tracks consecutive failures and tells how long to wait before the next attempt."""

    def __init__(self, max_delay: float, initial_delay: float = INITIAL_DELAY,
                 rng: random.Random | None = None) -> None:
        self.max_delay = max_delay
        self.initial_delay = initial_delay
        self.failures = 0
        self.failing_since: float | None = None
        self._rng = rng or random.Random()

    def next_delay(self, now: float) -> float:
        """Record a failure at `now` and return the seconds to wait before retrying."""
        if self.failing_since is None:
            self.failing_since = now
        exponent = min(self.failures, MAX_EXPONENT)  # 2.0 ** 1100 overflows a float
        ceiling = min(self.max_delay, self.initial_delay * DELAY_BACKOFF ** exponent)
        self.failures += 1
        return self._rng.uniform(0, ceiling)

    def reset(self, now: float) -> float:
        """Record a success; return how long the failures lasted (0 if there were none)."""
        lasted = 0.0 if self.failing_since is None else now - self.failing_since
        self.failures = 0
        self.failing_since = None
        return lasted
