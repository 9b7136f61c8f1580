"""A locked, stopped or absent PostgreSQL is invisible to clients: 202 at once, rows after."""

import threading
import time

import psycopg2
import pytest

from tests.client import get_json, make_event, post_json, post_stream
from tests.polling import wait_until

# Every test here runs once per form of the batch INSERT.
pytestmark = pytest.mark.usefixtures("insert_method")

LOCK_SECONDS = 5
STREAM_CONNECTIONS = 20


def assert_all_stored(database, accepted: list[str], timeout: float = 60) -> None:
    """Wait until every accepted event_id is in events, exactly once."""
    wait_until(lambda: database.count() >= len(set(accepted)), timeout,
               f"{len(set(accepted))} rows")
    stored = database.event_ids()
    assert len(stored) == len(set(stored)), "an event_id is stored twice"
    assert set(accepted) <= set(stored)


def hold_lock(database, locked: threading.Event, released: threading.Event) -> None:
    """Hold ACCESS EXCLUSIVE on events for LOCK_SECONDS (PostgreSQL does the waiting)."""
    conn = psycopg2.connect(database.url)
    try:
        with conn.cursor() as cur:
            cur.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            locked.set()
            cur.execute("SELECT pg_sleep(%s)", (LOCK_SECONDS,))
        conn.rollback()
    finally:
        released.set()
        conn.close()


@pytest.mark.slow
def test_table_lock_does_not_slow_requests(collector, database):
    baseline = post_stream(collector.url, 600, STREAM_CONNECTIONS)
    assert baseline.statuses == {202: 600}, baseline.statuses
    assert_all_stored(database, baseline.accepted)

    locked, released = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_lock, args=(database, locked, released))
    holder.start()
    assert locked.wait(10), "the lock was not taken"
    during = post_stream(collector.url, 100_000, STREAM_CONNECTIONS,
                         deadline_s=LOCK_SECONDS + 5, stop=released)
    holder.join(timeout=30)

    print(f"\nlock test: baseline p50 {baseline.percentile(50) * 1000:.1f} ms "
          f"p99 {baseline.percentile(99) * 1000:.1f} ms; during a {LOCK_SECONDS} s lock "
          f"{len(during.sent)} POSTs, p50 {during.percentile(50) * 1000:.1f} ms "
          f"p99 {during.percentile(99) * 1000:.1f} ms max {max(during.latencies) * 1000:.1f} ms")
    assert during.statuses == {202: len(during.sent)}, during.statuses
    assert len(during.sent) > 500, "too few requests ran during the lock to judge"
    # Not a benchmark: only proof that no request waited for the lock (5 s).
    assert max(during.latencies) < 1.5, max(during.latencies)
    assert_all_stored(database, baseline.accepted + during.accepted)


@pytest.mark.slow
def test_postgres_restart_mid_stream(collector, database, postgres):
    stop = threading.Event()
    answered = [0]
    results = []

    def on_sent(n):
        answered[0] = n

    stream = threading.Thread(target=lambda: results.append(
        post_stream(collector.url, 6000, 10, deadline_s=90, on_sent=on_sent)))
    stream.start()
    wait_until(lambda: answered[0] >= 500, 30, "500 answers before the outage")
    postgres.stop("fast")
    at_stop = answered[0]
    wait_until(lambda: answered[0] >= at_stop + 1000, 30, "1000 answers during the outage")
    status, ready = get_json(collector.url + "/ready")
    assert status == 200, ready  # the database state is reported, not a reason to be unready
    wait_until(lambda: collector.health()["database"] == "down", 10, "a worker seeing the outage")
    postgres.start("firehose_test")
    stream.join(timeout=120)
    stop.set()
    result = results[0]
    assert result.statuses == {202: len(result.sent)}
    assert_all_stored(database, result.accepted)


@pytest.mark.slow
def test_thousand_concurrent_connections(start_collector, database):
    collector = start_collector()
    result = post_stream(collector.url, 3000, 1000, deadline_s=120)
    assert result.statuses == {202: 3000}
    assert_all_stored(database, result.accepted)


@pytest.mark.slow
def test_sigterm_drains_the_queue(start_collector, database, spool_root):
    # Batches never fill and the interval is long: only the shutdown drain can flush them.
    collector = start_collector({"COLLECTOR_FLUSH_INTERVAL": "600",
                                 "COLLECTOR_BATCH_SIZE": "100000"})
    result = post_stream(collector.url, 500, 10)
    assert result.statuses == {202: 500}
    assert database.count() == 0
    assert collector.terminate() == 0
    assert database.count() == 500
    assert_all_stored(database, result.accepted)
    assert list((spool_root / "spool").iterdir()) == []  # drained, nothing left to replay
    assert "drained 2" in collector.output() or "drained" in collector.output()


@pytest.mark.slow
def test_sigterm_with_the_database_down_stops_at_once_and_loses_nothing(
        start_collector, database, postgres):
    collector = start_collector()
    postgres.stop("fast")
    result = post_stream(collector.url, 300, 10)
    assert result.statuses == {202: 300}
    wait_until(lambda: collector.health()["database"] == "down", 30, "the outage to be seen")
    began = time.monotonic()
    assert collector.terminate() == 0
    stopped_in = time.monotonic() - began
    print(f"\nSIGTERM with PostgreSQL down: stopped in {stopped_in:.1f} s "
          f"(graceful_timeout 30 s), 300 events left in the spool")
    assert stopped_in < 10, "the drain waited for a database that was not there"
    postgres.start("firehose_test")
    start_collector()  # the next collector on the same spool writes what the last one kept
    assert_all_stored(database, result.accepted)


def test_backpressure_when_the_spool_is_full(start_collector, database, postgres):
    collector = start_collector({"COLLECTOR_SPOOL_MAX_BYTES": "8192",
                                 "COLLECTOR_QUEUE_CAPACITY": "10"}, workers=1)
    postgres.stop("fast")
    accepted, refused = [], None
    for _ in range(200):  # bounded: 8 KiB holds far fewer than 200 events
        event = make_event()
        answer = post_json(collector.url + "/event", event)
        if answer.status == 202:
            accepted.append(event["event_id"])
            continue
        refused = answer
        break
    assert refused is not None, "the spool never filled"
    assert refused.status == 503
    assert refused.headers["retry-after"].isdigit()
    assert refused.body["limit"] == "spool_max_bytes"
    status, ready = get_json(collector.url + "/ready")
    assert status == 503 and "spool is full" in ready["problems"]
    postgres.start("firehose_test")
    assert_all_stored(database, accepted)
    wait_until(lambda: post_json(collector.url + "/event", make_event()).status == 202, 30,
               "the collector to accept again")
