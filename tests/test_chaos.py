"""A short chaos run in the suite: load while faults of every kind come, some at once.

`make chaos` runs the same for longer (tests/chaos.py says what it does); here the run
is 75 s with a fixed seed, and every event answered 202 must be stored exactly once.
"""

import pytest

from tests.chaos import run_chaos

CHAOS_SECONDS = 75
CHAOS_SEED = 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_chaos_run_loses_and_duplicates_nothing():
    ledger = run_chaos(CHAOS_SECONDS, CHAOS_SEED, log=lambda line: None)
    print("\n" + "\n".join(ledger.lines()))
    assert ledger.lost == 0, f"lost event_ids (first 20): {ledger.lost_ids}"
    assert ledger.duplicates == 0
    assert not ledger.fault_errors, ledger.fault_errors
    assert ledger.accepted > 1000, "too little load to judge"
    # Every kind of fault came at least once (disk_full only as root: it needs a tmpfs).
    assert len(ledger.faults) >= 7, ledger.faults
