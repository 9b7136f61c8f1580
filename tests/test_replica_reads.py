"""Reads from a streaming standby (COLLECTOR_READ_DATABASE_URL), writes to the primary:
the reads run on the standby only, show what it has replayed, and a stopped standby
answers 503 naming the read database while ingestion goes on untouched.
"""

import datetime
import json
import urllib.parse

from storage.readpool import APPLICATION_NAME as READER
from tests.client import get_json, make_event, post_stream, request
from tests.fixtures.postgres import TEST_DATABASE
from tests.polling import wait_until

BASE = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)


def start_reading_from_standby(start_collector_on, pair):
    return start_collector_on(pair.primary_db.url,
                              {"COLLECTOR_READ_DATABASE_URL": pair.standby_db.url}, workers=1)


def post_batch(collector, count: int, minute: int = 0) -> list[str]:
    """POST `count` events (timestamps from BASE + `minute`, a minute apart); return their ids."""
    events = [make_event(timestamp=(BASE + datetime.timedelta(minutes=minute + i))
                         .isoformat().replace("+00:00", "Z")) for i in range(count)]
    answer = request(collector.url + "/events", "POST", json.dumps(events).encode(),
                     {"Content-Type": "application/json"})
    assert answer.status == 202, answer.body
    return [event["event_id"] for event in events]


def read_ids(collector) -> set[str]:
    status, body = get_json(collector.url + "/events?limit=1000")
    assert status == 200, body
    return {event["event_id"] for event in body["events"]}


def counted(collector) -> int:
    query = urllib.parse.urlencode({"bucket": "day", "from": "2024-05-01T00:00:00Z",
                                    "to": "2024-05-03T00:00:00Z"})
    status, body = get_json(f"{collector.url}/counts?{query}")
    assert status == 200, body
    return sum(bucket["count"] for bucket in body["counts"])


def readers(db) -> list[str]:
    """Return the last statement of each read connection open on a server."""
    return [row[0] for row in db.query("SELECT query FROM pg_stat_activity "
                                       "WHERE application_name = %s", (READER,))]


def test_reads_run_on_the_standby_and_show_what_it_replayed(start_collector_on, replica):
    collector = start_reading_from_standby(start_collector_on, replica)
    stored = post_batch(collector, 50)
    wait_until(lambda: replica.primary_db.count() == 50, 10, "50 rows on the primary")
    replica.wait_for_replay()
    # Each read leaves its statement on the standby's read connection, kept in the pool.
    assert read_ids(collector) == set(stored)
    assert any("FROM events" in query for query in readers(replica.standby_db))
    assert counted(collector) == 50
    assert any("FROM event_counts" in query for query in readers(replica.standby_db))
    assert readers(replica.primary_db) == []  # not one read connection to the primary

    # A lag at will: the standby receives WAL but applies none. What the primary has
    # stored is not visible to readers until the standby has replayed it.
    replica.pause_replay()
    late = post_batch(collector, 10, minute=60)
    wait_until(lambda: replica.primary_db.count() == 60, 10, "60 rows on the primary")
    assert read_ids(collector) == set(stored)
    assert counted(collector) == 50
    replica.resume_replay()
    replica.wait_for_replay()
    assert read_ids(collector) == set(stored + late)
    assert counted(collector) == 60


def test_a_stopped_standby_fails_reads_not_ingestion(start_collector_on, replica):
    collector = start_reading_from_standby(start_collector_on, replica)
    before = post_batch(collector, 20)
    wait_until(lambda: replica.primary_db.count() == 20, 10, "20 rows on the primary")
    replica.wait_for_replay()
    assert read_ids(collector) == set(before)  # a read connection is open, and will break

    replica.standby.stop("immediate")
    for path in ("/events", "/counts?bucket=day"):
        for _ in range(2):  # the broken pooled connection, then a refused new one
            answer = request(collector.url + path)
            assert answer.status == 503, answer.body
            assert answer.body["title"] == "Database unavailable", answer.body
            assert "read database (COLLECTOR_READ_DATABASE_URL" in answer.body["description"]
            assert answer.headers["retry-after"].isdigit()

    during = post_stream(collector.url, 300, 10, deadline_s=30)
    assert during.statuses == {202: 300}, during.statuses
    wait_until(lambda: replica.primary_db.count() == 320, 10, "320 rows on the primary")
    assert set(before + during.accepted) == set(replica.primary_db.event_ids())

    # Started again, the standby catches up from its slot, and reads come back by themselves.
    replica.standby.start(TEST_DATABASE)
    replica.wait_for_replay()
    assert read_ids(collector) == set(before + during.accepted)
