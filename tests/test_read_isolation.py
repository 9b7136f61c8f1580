"""Reads never slow writes: while GET /events waits in PostgreSQL, the same worker answers
POSTs at once and its flusher keeps storing rows; a read gives up after its timeout.

The slow read is real: the test holds an ACCESS EXCLUSIVE lock on the partition of the
current month, which the reads ask for and the writes (events of 2024, stored in the
default partition) never touch.
"""

import datetime
import threading
import urllib.parse

import psycopg2
import pytest

from storage import partitions
from storage.readpool import BUSY, ReadFailed, ReadPool
from tests.client import get_json, post_stream, request
from tests.polling import wait_until

UTC = datetime.timezone.utc


class PartitionLock:
    """Holds ACCESS EXCLUSIVE on one partition from a thread until released."""

    def __init__(self, database, partition: str) -> None:
        self._database = database
        self._partition = partition
        self.locked = threading.Event()
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._hold)

    def __enter__(self) -> "PartitionLock":
        self._thread.start()
        assert self.locked.wait(10), "the lock was not taken"
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._thread.join(timeout=30)

    def _hold(self) -> None:
        conn = psycopg2.connect(self._database.url)
        try:
            with conn.cursor() as cur:
                cur.execute(f"LOCK TABLE {self._partition} IN ACCESS EXCLUSIVE MODE")
                self.locked.set()
                self.release.wait(timeout=60)
            conn.rollback()
        finally:
            conn.close()


def this_month(collector, database) -> partitions.Partition:
    """Return the current month's partition, once the service has made it."""
    partition = partitions.partition_of(datetime.datetime.now(UTC), "month")
    wait_until(lambda: database.query("SELECT to_regclass(%s) IS NOT NULL",
                                      (partition.name,))[0][0], 30, partition.name)
    return partition


def read_url(collector, partition: partitions.Partition) -> str:
    query = urllib.parse.urlencode({"from": partition.start.isoformat(),
                                    "to": partition.end.isoformat()})
    return f"{collector.url}/events?{query}"


def stored_in_default(database) -> int:
    return database.query("SELECT count(*) FROM events_default")[0][0]


def readers_waiting(database) -> int:
    return database.query("SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                          "'firehose-reader' AND wait_event_type = 'Lock'")[0][0]


@pytest.mark.slow
def test_slow_reads_do_not_hold_up_posts_or_the_flusher(start_collector, database):
    collector = start_collector({"COLLECTOR_READ_TIMEOUT": "20",
                                 "COLLECTOR_READ_POOL_SIZE": "2"}, workers=1)
    partition = this_month(collector, database)
    answers = []
    with PartitionLock(database, partition.name) as lock:
        readers = [threading.Thread(target=lambda: answers.append(get_json(
            read_url(collector, partition)))) for _ in range(3)]
        for reader in readers:
            reader.start()
        # Two reads wait in PostgreSQL, the third for one of the two read connections.
        wait_until(lambda: readers_waiting(database) == 2, 10, "2 reads waiting for the lock")

        result = post_stream(collector.url, 600, 10, deadline_s=30)
        # (counted in the default partition: a count of events would wait for the lock too)
        wait_until(lambda: stored_in_default(database) == 600, 10,
                   "the 600 rows, reads still waiting")
        assert all(reader.is_alive() for reader in readers) and not lock.release.is_set(), answers
        print(f"\nduring 3 blocked reads: 600 POSTs, p50 {result.percentile(50) * 1000:.1f} ms "
              f"p99 {result.percentile(99) * 1000:.1f} ms "
              f"max {max(result.latencies) * 1000:.1f} ms")
        assert result.statuses == {202: 600}, result.statuses
        assert max(result.latencies) < 1.0, max(result.latencies)
    for reader in readers:
        reader.join(timeout=30)
    assert [status for status, _ in answers] == [200, 200, 200], answers


@pytest.mark.slow
def test_a_read_past_its_timeout_is_cancelled_and_says_so(start_collector, database):
    collector = start_collector({"COLLECTOR_READ_TIMEOUT": "1"}, workers=1)
    partition = this_month(collector, database)
    with PartitionLock(database, partition.name):
        answer = request(read_url(collector, partition))
    assert answer.status == 503, answer.body
    assert answer.body["limit"] == "read_timeout"
    assert 0.9 < answer.latency < 3.0, answer.latency
    status, body = get_json(read_url(collector, partition))  # the next read is answered
    assert status == 200 and body["events"] == [], body


def test_a_read_finding_every_connection_busy_is_told_so(database):
    pool = ReadPool(database.url, size=1, read_timeout=5, wait_timeout=0.2)
    try:
        with pool.connection() as held:
            with pytest.raises(ReadFailed) as caught:
                pool.fetch("SELECT 1", ())
            assert caught.value.reason == BUSY
            with held.cursor() as cur:
                cur.execute("SHOW transaction_read_only")  # set per transaction
                assert cur.fetchone() == ("on",)
        assert pool.fetch("SELECT 1", ()) == [(1,)]  # given back, lent again
    finally:
        pool.close()
