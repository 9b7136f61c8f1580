"""GET /counts equals a direct count(*) ... GROUP BY on events: under concurrent workers,
after a PostgreSQL outage, and after a spool replay of events already stored.

Every test compares the whole rollup tables with counts computed from events, and
GET /counts answers with the same counts computed for their range.
"""

import datetime
import os
import random
import signal
import threading
import urllib.parse

import msgspec
import pytest

from collector.spool import encode_record
from collector.validation import Event
from tests.client import get_json, make_event, post_json, post_stream
from tests.polling import wait_until

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
PAGES = ("/home", "/cart", "/checkout", "/p/1", "/p/2")
USERS = range(1, 30)  # few users, so that each has many events
ROLLUP_KEYS = {"COLLECTOR_ROLLUP_KEYS": "page,campaign"}
WINDOW = (NOW - datetime.timedelta(days=2), NOW + datetime.timedelta(days=2))

UNITS = "(VALUES ('minute'), ('hour'), ('day')) AS u (unit)"
# (what, the rollup table, the same counts computed from events)
TRUTHS = [
    ("totals", "SELECT unit, bucket, n FROM event_counts",
     f"SELECT u.unit, date_trunc(u.unit, \"timestamp\", 'UTC'), count(*) FROM events "
     f"CROSS JOIN {UNITS} GROUP BY 1, 2"),
    ("per user", "SELECT user_id, bucket, n FROM event_counts_by_user",
     "SELECT user_id, date_trunc('minute', \"timestamp\", 'UTC'), count(*) FROM events "
     "GROUP BY 1, 2"),
    ("per key", "SELECT key, unit, bucket, value, n FROM event_counts_by_key",
     f"SELECT k.key, u.unit, date_trunc(u.unit, \"timestamp\", 'UTC'), "
     f"left(metadata ->> k.key, 200), count(*) FROM events "
     f"JOIN rollup_keys k ON metadata ->> k.key IS NOT NULL CROSS JOIN {UNITS} "
     f"GROUP BY 1, 2, 3, 4"),
]


def varied_event() -> dict:
    """An event somewhere in WINDOW (now and then far past or future), for one of few users."""
    roll = random.random()
    if roll < 0.01:
        moment = "1900-01-01T00:00:00Z"
    elif roll < 0.02:
        moment = "2999-12-31T23:59:59Z"
    elif roll < 0.1:
        moment = "2024-05-01T12:34:56.789Z"  # the default partition
    else:
        seconds = random.uniform(0, (WINDOW[1] - WINDOW[0]).total_seconds())
        moment = (WINDOW[0] + datetime.timedelta(seconds=seconds)).isoformat()
    metadata = {"page": random.choice(PAGES), "n": random.randrange(100)}
    if random.random() < 0.3:
        metadata["campaign"] = random.choice(["a", "b", None, 7])  # null is not counted
    return make_event(user_id=random.choice(USERS), timestamp=moment, metadata=metadata)


def keys_registered(database) -> bool:
    exists = database.query("SELECT to_regclass('rollup_keys') IS NOT NULL")[0][0]
    return exists and len(database.query("SELECT key FROM rollup_keys")) == 2


def assert_rollups_match(database) -> None:
    """Check every rollup table against counts computed from events, row for row."""
    for what, rollup, truth in TRUTHS:
        kept, computed = database.query(rollup), database.query(truth)
        assert sorted(kept) == sorted(computed), f"{what}: rollup differs from events"
    total = database.query("SELECT sum(n) FROM event_counts WHERE unit = 'day'")[0][0]
    assert total == database.count(), "the day counts do not add up to the events"


def counts(url: str, **params) -> dict:
    status, body = get_json(url + "/counts?" + urllib.parse.urlencode(params))
    assert status == 200, body
    return body


def assert_answers_match(collector, database) -> None:
    """Check GET /counts over WINDOW, per unit, for a user and per page, against events."""
    since, until = (m.isoformat() for m in WINDOW)
    user = database.query("SELECT user_id FROM events GROUP BY 1 ORDER BY count(*) DESC "
                          "LIMIT 1")[0][0]
    for unit in ("minute", "hour", "day"):
        answer = counts(collector.url, bucket=unit, **{"from": since, "to": until})
        low, high = answer["from"], answer["to"]
        expected = database.query(
            "SELECT date_trunc(%s, \"timestamp\", 'UTC'), count(*) FROM events "
            "WHERE \"timestamp\" >= %s AND \"timestamp\" < %s GROUP BY 1", (unit, low, high))
        assert _rows(answer, "count") == sorted(expected), unit

        answer = counts(collector.url, bucket=unit, user_id=user, **{"from": since, "to": until})
        expected = database.query(
            "SELECT date_trunc(%s, \"timestamp\", 'UTC'), count(*) FROM events "
            "WHERE user_id = %s AND \"timestamp\" >= %s AND \"timestamp\" < %s GROUP BY 1",
            (unit, user, low, high))
        assert _rows(answer, "count") == sorted(expected), f"user {user} per {unit}"

        answer = counts(collector.url, bucket=unit, key="page", **{"from": since, "to": until})
        expected = database.query(
            "SELECT date_trunc(%s, \"timestamp\", 'UTC'), metadata ->> 'page', count(*) "
            "FROM events WHERE \"timestamp\" >= %s AND \"timestamp\" < %s GROUP BY 1, 2",
            (unit, low, high))
        assert _rows(answer, "value", "count") == sorted(expected), f"page per {unit}"
        assert answer["truncated"] is False and answer["counted_since"]


def _rows(answer: dict, *fields: str) -> list[tuple]:
    return sorted((datetime.datetime.fromisoformat(row["start"]), *(row[f] for f in fields))
                  for row in answer["counts"])


def wait_stored(collector, database, accepted: list[str], timeout: float = 60) -> None:
    wait_until(lambda: database.count() >= len(set(accepted)), timeout,
               f"{len(set(accepted))} stored events")
    wait_until(lambda: collector.health()["pending"] == 0, timeout, "an empty queue")


def stream_in_background(url: str, count: int):
    """Start a bounded stream of varied events in a thread; return (thread, results, answered)."""
    results, answered = [], [0]

    def on_sent(n):
        answered[0] = n

    thread = threading.Thread(target=lambda: results.append(post_stream(
        url, count, 10, deadline_s=90, on_sent=on_sent, factory=varied_event)))
    thread.start()
    return thread, results, answered


@pytest.mark.slow
def test_counts_equal_events_under_two_concurrent_workers(start_collector, database):
    collector = start_collector(ROLLUP_KEYS)
    wait_until(lambda: keys_registered(database), 30, "the rollup keys")
    thread, results, answered = stream_in_background(collector.url, 4000)
    # Counts read during the stream only ever grow: each commit adds its events at once.
    seen, window = [], {"from": WINDOW[0].isoformat(), "to": WINDOW[1].isoformat()}
    while thread.is_alive() and len(seen) < 200:  # bounded
        answer = counts(collector.url, bucket="day", **window)
        seen.append(sum(row["count"] for row in answer["counts"]))
    thread.join(timeout=120)
    result = results[0]
    assert result.statuses == {202: 4000}, result.statuses
    assert seen == sorted(seen) and len(seen) > 1, seen
    wait_stored(collector, database, result.accepted)
    assert_rollups_match(database)
    assert_answers_match(collector, database)


@pytest.mark.slow
def test_counts_equal_events_after_an_outage(start_collector, database, postgres):
    collector = start_collector(ROLLUP_KEYS)
    wait_until(lambda: keys_registered(database), 30, "the rollup keys")
    thread, results, answered = stream_in_background(collector.url, 3000)
    wait_until(lambda: answered[0] >= 500, 30, "500 answers before the outage")
    postgres.stop("fast")
    at_stop = answered[0]
    wait_until(lambda: answered[0] >= at_stop + 1000, 30, "1000 answers during the outage")
    postgres.start("firehose_test")
    thread.join(timeout=120)
    result = results[0]
    assert result.statuses == {202: 3000}, result.statuses
    wait_stored(collector, database, result.accepted)
    assert_rollups_match(database)
    assert_answers_match(collector, database)


@pytest.mark.slow
def test_sigkill_of_a_worker_mid_stream_counts_each_event_once(start_collector, database):
    collector = start_collector(ROLLUP_KEYS)
    wait_until(lambda: keys_registered(database), 30, "the rollup keys")
    thread, results, answered = stream_in_background(collector.url, 3000)
    wait_until(lambda: answered[0] >= 1000, 30, "1000 answers")
    victim = collector.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    accepted = results[0].accepted
    # gunicorn starts a new worker, which replays the dead one's spool, then removes it.
    wait_until(lambda: not list(collector.spool_dir.glob(f"{victim}-*")), 60,
               "the replay of the killed worker's spool")
    wait_until(lambda: set(accepted) <= set(database.event_ids()), 60, "every accepted event")
    wait_stored(collector, database, accepted)
    stored = database.event_ids()
    assert len(stored) == len(set(stored))
    assert_rollups_match(database)


@pytest.mark.slow
def test_replay_of_stored_events_is_not_counted_twice(start_collector, database, spool_root):
    collector = start_collector(ROLLUP_KEYS, workers=1)
    wait_until(lambda: keys_registered(database), 30, "the rollup keys")
    stored = [varied_event() for _ in range(300)]
    for event in stored:
        assert post_json(collector.url + "/event", event).status == 202
    wait_until(lambda: database.count() == 300, 30, "300 rows")
    before = database.query("SELECT sum(n) FROM event_counts WHERE unit = 'minute'")[0][0]
    assert before == 300
    assert collector.terminate() == 0

    # A dead worker's spool holding the 300 stored events again, and 50 new ones: what a
    # SIGKILL between the commit of a batch and the release of its spool segment leaves.
    fresh = [varied_event() for _ in range(50)]
    records = [encode_record(msgspec.msgpack.encode(Event(
        e["event_id"], e["user_id"], datetime.datetime.fromisoformat(
            e["timestamp"].replace("Z", "+00:00")).isoformat(),
        msgspec.json.encode(e["metadata"]).decode(), 1714564800.0))) for e in stored + fresh]
    dead = spool_root / "spool" / "12345-deadbeef0000"
    dead.mkdir(parents=True)
    (dead / "00000001.seg").write_bytes(b"".join(records))
    (dead / "lock").touch()

    collector = start_collector(ROLLUP_KEYS, workers=1)
    wait_until(lambda: database.count() == 350, 30, "the 50 new events of the replay")
    wait_until(lambda: not dead.exists(), 30, "the replayed spool's removal")
    assert collector.health()["duplicates"] == 300
    assert database.query("SELECT sum(n) FROM event_counts WHERE unit = 'minute'")[0][0] == 350
    assert_rollups_match(database)
