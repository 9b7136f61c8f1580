"""POST /event through real gunicorn: answered 202 and stored exactly as sent."""

import json
import uuid

import pytest

from tests.client import get_json, make_event, post_json, request
from tests.polling import wait_until

# Every test here runs once per form of the batch INSERT.
pytestmark = pytest.mark.usefixtures("insert_method")


def test_event_is_stored_with_exact_values(collector, database):
    event_id = str(uuid.uuid4())
    metadata = {"page": "/caf\u00e9", "emoji": "\U0001F600", "nested": {"list": [1, 2.5, None, True],
                "deep": {"x": "y"}}, "big": 12345678901234567890, "text": "back\\slash \"q\""}
    answer = post_json(collector.url + "/event", {
        "event_id": event_id, "user_id": 9223372036854775807,
        "timestamp": "2024-05-01T12:30:00.123456+05:30", "metadata": metadata})
    assert answer.status == 202, answer.body
    assert answer.body == {"status": "accepted", "event_id": event_id}

    wait_until(lambda: database.count() == 1, 10, "the event's row")
    row = database.query("SELECT event_id::text, user_id, "
                         "to_char(\"timestamp\" AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), "
                         "metadata::text, received_at > now() - interval '1 minute' FROM events")[0]
    assert row[0] == event_id
    assert row[1] == 9223372036854775807
    assert row[2] == "2024-05-01 07:00:00.123456"  # +05:30 converted to UTC
    assert json.loads(row[3]) == metadata
    assert row[4] is True


@pytest.mark.parametrize("timestamp, utc", [
    ("2024-05-01T12:00:00", "2024-05-01 12:00:00"),  # no offset: the contract reads UTC
    # RFC 3339 allows offsets up to 23:59; PostgreSQL's timestamptz input only to 15:59.
    ("2024-05-01T12:00:00-19:21", "2024-05-02 07:21:00"),
])
def test_timestamps_are_stored_as_their_utc_instant(collector, database, timestamp, utc):
    answer = post_json(collector.url + "/event", make_event(timestamp=timestamp))
    assert answer.status == 202
    wait_until(lambda: database.count() == 1, 10, "the event's row")
    stored = database.query("SELECT to_char(\"timestamp\" AT TIME ZONE 'UTC', "
                            "'YYYY-MM-DD HH24:MI:SS') FROM events")[0][0]
    assert stored == utc
    assert database.count("dead_letters") == 0


def test_server_assigns_event_id_when_absent(collector, database):
    event = make_event()
    del event["event_id"]
    answer = post_json(collector.url + "/event", event)
    assert answer.status == 202
    assigned = answer.body["event_id"]
    assert uuid.UUID(assigned)
    wait_until(lambda: database.event_ids() == [assigned], 10, "the assigned event_id's row")


def test_repeated_event_id_is_stored_once(collector, database):
    event = make_event()
    answers = [post_json(collector.url + "/event", event) for _ in range(5)]
    assert [a.status for a in answers] == [202] * 5
    assert {a.body["event_id"] for a in answers} == {event["event_id"]}
    wait_until(lambda: collector.health()["pending"] == 0 and database.count() == 1, 10,
               "the flush of all five")
    marker = make_event()
    assert post_json(collector.url + "/event", marker).status == 202
    wait_until(lambda: marker["event_id"] in database.event_ids(), 10, "a later event")
    assert database.event_ids().count(event["event_id"]) == 1


def test_health_and_ready(collector, database):
    status, ready = get_json(collector.url + "/ready")
    assert status == 200 and ready["status"] == "ready"
    post_json(collector.url + "/event", make_event())
    wait_until(lambda: database.count() == 1, 10, "the row")
    health = collector.health()
    for key in ("queue_depth", "accepted", "flushed", "retried", "last_flush_error",
                "spool_bytes", "oldest_unflushed_age_s", "dead_lettered", "database"):
        assert key in health
    assert request(collector.url + "/health", "DELETE").status == 405
