"""Partitions of events: made ahead by the service, a DEFAULT one for any timestamp, strays
moved out of it, expired partitions detached and dropped whole, all safe from many workers.
"""

import concurrent.futures
import datetime
import urllib.parse

import psycopg2
import pytest

from storage import partitions
from storage.database import ensure_schema
from tests.client import get_json, make_event, post_json
from tests.polling import wait_until

UTC = datetime.timezone.utc


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def conn(database):
    """A connection to the test database with the schema applied."""
    connection = psycopg2.connect(database.url)
    ensure_schema(connection)
    yield connection
    connection.close()


def insert(database, *moments: str) -> None:
    """Store one event per timestamp, straight in SQL (the rollup trigger counts them)."""
    for moment in moments:
        database.query("INSERT INTO events VALUES (gen_random_uuid(), 1, %s, '{}', now())",
                       (moment,))


def where_stored(database) -> dict[str, int]:
    rows = database.query("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1")
    return dict(rows)


def attached(database) -> set[str]:
    return {r[0] for r in database.query(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'events'::regclass")}


def test_the_service_makes_partitions_ahead_at_start(collector, database):
    now = datetime.datetime.now(UTC)
    names = {p.name for p in partitions.wanted(now, "month")}
    assert len(names) == 1 + 1 + partitions.AHEAD["month"]
    wait_until(lambda: attached(database) == names | {"events_default"}, 30,
               f"partitions {sorted(names)}")
    event = make_event(timestamp=now.isoformat())
    assert post_json(collector.url + "/event", event).status == 202
    wait_until(lambda: database.count() == 1, 10, "the event's row")
    assert where_stored(database) == {partitions.partition_of(now, "month").name: 1}


def test_far_past_and_future_events_are_stored_and_read_back(collector, database):
    events = [make_event(timestamp="1900-01-01T00:00:00Z"),
              make_event(timestamp="2999-12-31T23:59:59.999999Z")]
    for event in events:
        assert post_json(collector.url + "/event", event).status == 202
    wait_until(lambda: database.count() == 2, 10, "both rows")
    assert where_stored(database) == {"events_default": 2}
    for event, (since, until) in zip(events, [("1899-12-31T00:00:00Z", "1900-01-02T00:00:00Z"),
                                              ("2999-12-31T00:00:00Z", "3000-01-01T00:00:00Z")]):
        query = urllib.parse.urlencode({"from": since, "to": until})
        status, body = get_json(f"{collector.url}/events?{query}")
        assert status == 200, body
        assert [e["event_id"] for e in body["events"]] == [event["event_id"]]
    status, body = get_json(collector.url + "/counts?bucket=day&from=2999-12-31T00:00:00Z"
                                            "&to=3000-01-01T00:00:00Z")
    assert status == 200 and body["counts"] == [{"start": "2999-12-31T00:00:00+00:00",
                                                  "count": 1}], body


def test_a_new_partition_takes_its_rows_from_the_default_one(database, conn):
    insert(database, "2025-01-10T00:00:00Z", "2025-01-31T23:59:59.999999Z",
           "2025-02-01T00:00:00Z", "1900-01-01T00:00:00Z")
    assert where_stored(database) == {"events_default": 4}
    counted = database.query("SELECT unit, bucket, n FROM event_counts ORDER BY 1, 2")

    created = partitions.ensure_partitions(conn, at("2025-01-15T12:00:00"), "month")

    assert created == ["events_2024_12", "events_2025_01", "events_2025_02", "events_2025_03"]
    assert where_stored(database) == {"events_2025_01": 2, "events_2025_02": 1,
                                      "events_default": 1}
    # Moved, not stored again: the counts are those of the first INSERTs.
    assert database.query("SELECT unit, bucket, n FROM event_counts ORDER BY 1, 2") == counted
    assert partitions.ensure_partitions(conn, at("2025-01-15T12:00:00"), "month") == []


def test_retention_detaches_and_drops_whole_expired_partitions(database, conn):
    partitions.ensure_partitions(conn, at("2024-03-15T00:00:00"), "month")  # 2024-02 to 2024-05
    insert(database, "2024-02-10T00:00:00Z", "2024-03-31T23:00:00Z", "2024-04-01T00:00:00Z",
           "2024-05-20T00:00:00Z", "1900-01-01T00:00:00Z")
    counted = database.query("SELECT sum(n) FROM event_counts WHERE unit = 'day'")

    # 60 days before 2024-06-10 is 2024-04-11: February and March ended before it.
    dropped = partitions.drop_expired(conn, at("2024-06-10T00:00:00"), retention_days=60)

    assert sorted(dropped) == ["events_2024_02", "events_2024_03"]
    assert where_stored(database) == {"events_2024_04": 1, "events_2024_05": 1,
                                      "events_default": 1}
    for name in dropped:  # dropped, not merely detached
        assert database.query("SELECT to_regclass(%s)", (name,)) == [(None,)]
    assert "events_default" in attached(database)  # never dropped, whatever it holds
    # The counts outlive the events they counted.
    assert database.query("SELECT sum(n) FROM event_counts WHERE unit = 'day'") == counted
    assert partitions.drop_expired(conn, at("2024-06-10T00:00:00"), retention_days=60) == []


def test_the_service_applies_the_retention_setting(start_collector, database, conn):
    partitions.ensure_partitions(conn, at("2024-03-15T00:00:00"), "month")
    insert(database, "2024-03-01T00:00:00Z")
    start_collector({"COLLECTOR_RETENTION_DAYS": "30"})
    wait_until(lambda: not {"events_2024_02", "events_2024_03", "events_2024_04",
                            "events_2024_05"} & attached(database), 30,
               "the 2024 partitions to be dropped")
    assert database.count() == 0


def test_many_workers_maintaining_at_once_make_each_partition_once(database, conn):
    now = at("2030-06-15T00:00:00")
    urls = [database.url] * 6

    def maintain(url: str) -> tuple[list[str], list[str]]:
        own = psycopg2.connect(url)
        try:
            ensure_schema(own)
            return (partitions.ensure_partitions(own, now, "day"),
                    partitions.drop_expired(own, now, retention_days=3))
        finally:
            own.close()

    with concurrent.futures.ThreadPoolExecutor(len(urls)) as pool:
        results = list(pool.map(maintain, urls))
    created = [name for made, _ in results for name in made]
    dropped = [name for _, gone in results for name in gone]
    wanted = {p.name for p in partitions.wanted(now, "day")}
    assert sorted(created) == sorted(wanted), "a partition made twice or not at all"
    assert attached(database) == wanted | {"events_default"}
    assert dropped == []  # the oldest wanted one, 2030-06-14, is within 3 days


def test_a_changed_interval_skips_partitions_that_would_overlap(database, conn):
    now = at("2030-06-15T00:00:00")
    partitions.ensure_partitions(conn, now, "month")
    # Every day wanted lies in a month partition: none is made, and nothing fails.
    assert partitions.ensure_partitions(conn, now, "day") == []
    later = at("2030-08-28T00:00:00")  # the month partitions end with August
    made = partitions.ensure_partitions(conn, later, "day")
    assert made == ["events_2030_09_01", "events_2030_09_02", "events_2030_09_03",
                    "events_2030_09_04"]
    insert(database, "2030-09-02T10:00:00Z")
    assert where_stored(database) == {"events_2030_09_02": 1}


def test_a_table_from_before_partitioning_is_refused_clearly(database):
    database.query("CREATE TABLE events (event_id uuid, user_id bigint)")
    connection = psycopg2.connect(database.url)
    try:
        with pytest.raises(psycopg2.Error) as caught:
            ensure_schema(connection)
    finally:
        connection.close()
    assert "events exists but is not partitioned" in str(caught.value)
