"""Wait for a condition with a deadline, instead of sleeping (tests never sleep to sync)."""

import time
from typing import Callable, TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.05


def wait_until(predicate: Callable[[], T], timeout: float, what: str,
               give_up: tuple[type[Exception], ...] = (),
               failure: type[Exception] = AssertionError) -> T:
    """Return the first truthy value of predicate(); raise `failure` naming `what` after
    `timeout` s. An exception of `give_up` from the predicate ends the wait at once (it saw
    that waiting is pointless); any other counts as not yet (e.g. connection refused)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
        except give_up:
            raise
        except Exception as ex:
            last = ex
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise failure(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")
        time.sleep(POLL_INTERVAL)
