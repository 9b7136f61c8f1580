"""The per-user count rows are appended, one per (user, minute) per INSERT, and merged by the
maintenance greenlet once their minute is over: the sums never change, however the merges
and the INSERTs interleave, and a merged minute holds one row per user."""

import datetime
import functools
import threading
import uuid

import psycopg2

from collector.maintenance import MERGE_LAG, Maintenance
from storage import database as storage_database
from storage.rollups import merge_user_minutes
from storage.writer import BatchWriter

UTC = datetime.timezone.utc
PER_USER = "SELECT user_id, bucket, sum(n) FROM event_counts_by_user GROUP BY 1, 2"
FROM_EVENTS = ("SELECT user_id, date_trunc('minute', \"timestamp\", 'UTC'), count(*) "
               "FROM events GROUP BY 1, 2")
ROWS_PER_USER_MINUTE = ("SELECT max(c) FROM (SELECT count(*) AS c FROM event_counts_by_user "
                        "WHERE bucket >= %s AND bucket < %s GROUP BY user_id, bucket) AS r")


def writer_for(database) -> BatchWriter:
    return BatchWriter(functools.partial(storage_database.connect, database.url, 30, 10))


def maintenance_for(database) -> Maintenance:
    return Maintenance(functools.partial(storage_database.connect, database.url, 30, 10,
                                         autocommit=False), (), "month", 0)


def batch(minute: datetime.datetime, users: range, count: int) -> list[tuple]:
    """`count` events spread over `users`, stamped within `minute`."""
    return [(str(uuid.uuid4()), users[i % len(users)],
             (minute + datetime.timedelta(seconds=i % 60)).isoformat(), '{"n": 1}', 0.0)
            for i in range(count)]


def test_a_closed_minute_is_merged_to_one_row_per_user_with_the_same_sums(database):
    now = datetime.datetime.now(UTC).replace(second=30, microsecond=0)
    closed = now.replace(second=0) - MERGE_LAG - datetime.timedelta(minutes=2)
    writer = writer_for(database)
    try:
        for _ in range(5):  # five INSERTs, each with every user of the closed minute
            assert writer.write(batch(closed, range(1, 11), 40)).inserted == 40
        assert writer.write(batch(now.replace(second=0), range(1, 11), 40)).inserted == 40
    finally:
        writer.close()
    before = sorted(database.query(PER_USER))
    assert before == sorted(database.query(FROM_EVENTS))
    span = (closed, closed + datetime.timedelta(minutes=1))
    assert database.query(ROWS_PER_USER_MINUTE, span)[0][0] == 5

    maintenance = maintenance_for(database)
    assert maintenance.merge_once(now) == 10  # one row for each of the 10 users
    assert database.query(ROWS_PER_USER_MINUTE, span)[0][0] == 1
    assert sorted(database.query(PER_USER)) == before
    # The open minute is left alone, and a second merge of the same span has nothing to do.
    assert database.query("SELECT count(*) FROM event_counts_by_user WHERE bucket = %s",
                          (now.replace(second=0),))[0][0] == 10
    assert maintenance.merge_once(now) == 0


def test_merges_beside_inserts_and_each_other_keep_the_sums_exact(database):
    now = datetime.datetime.now(UTC).replace(second=30, microsecond=0)
    minutes = [now.replace(second=0) - MERGE_LAG - datetime.timedelta(minutes=m)
               for m in range(1, 4)]
    writer_for(database).prepare()
    failures = []

    def insert(rounds: int) -> None:
        writer = writer_for(database)
        try:
            for i in range(rounds):  # late events too: into minutes already merged
                writer.write(batch(minutes[i % len(minutes)], range(1, 21), 60))
        except Exception as ex:  # reported below; a thread's exception is otherwise lost
            failures.append(ex)
        finally:
            writer.close()

    def merge(rounds: int) -> None:
        try:
            for _ in range(rounds):
                conn = psycopg2.connect(database.url)
                try:
                    merge_user_minutes(conn, minutes[-1], now)
                finally:
                    conn.close()
        except Exception as ex:
            failures.append(ex)

    threads = ([threading.Thread(target=insert, args=(30,)) for _ in range(2)]
               + [threading.Thread(target=merge, args=(20,)) for _ in range(2)])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "a thread did not end in 120 s"
    assert not failures, failures
    assert database.count() == 2 * 30 * 60
    assert sorted(database.query(PER_USER)) == sorted(database.query(FROM_EVENTS))
