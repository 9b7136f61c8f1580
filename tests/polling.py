"""Wait for a condition with a deadline, instead of sleeping (tests never sleep to sync)."""

import time
from typing import Callable, TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.05


def wait_until(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Return the first truthy value of predicate(); fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except Exception as ex:  # e.g. connection refused while a server starts
            last = ex
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what} "
                                 f"(last: {last!r})")
        time.sleep(POLL_INTERVAL)
