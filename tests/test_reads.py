"""GET /events and GET /counts through real gunicorn: filters, order, keyset pages that
hold still while events arrive, and a 400 naming the parameter for every bad one.
"""

import datetime
import json
import random
import urllib.parse

import pytest

from tests.client import get_json, make_event, post_json, request
from tests.fixtures.collector import start_module_collector
from tests.polling import wait_until

BASE = datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc)


def url_of(collector, path: str, **params) -> str:
    return f"{collector.url}{path}?{urllib.parse.urlencode(params)}"


def ids(collector, **params) -> list[str]:
    status, body = get_json(url_of(collector, "/events", **params))
    assert status == 200, body
    return [event["event_id"] for event in body["events"]]


def newest_first(events: list[dict]) -> list[str]:
    ordered = sorted(events, key=lambda e: (e["timestamp"], e["event_id"]), reverse=True)
    return [e["event_id"] for e in ordered]


def stored_events(collector, database, count: int) -> list[dict]:
    """POST `count` events a minute apart, for users 1 to 3, and wait for their rows."""
    events = []
    for i in range(count):
        moment = BASE + datetime.timedelta(minutes=i)
        events.append(make_event(user_id=1 + i % 3, timestamp=moment.isoformat().replace(
            "+00:00", "Z"), metadata={"page": f"/p/{i % 5}", "nested": {"even": i % 2 == 0}}))
    body = json.dumps(events).encode()
    answer = request(collector.url + "/events", "POST", body,
                     {"Content-Type": "application/json"})
    assert answer.status == 202, answer.body
    wait_until(lambda: database.count() == count, 10, f"{count} rows")
    return events


METADATA_INDEX = "SELECT to_regclass('events_metadata_idx') IS NOT NULL"


def test_without_the_metadata_index_metadata_filters_still_answer(start_collector, database):
    # The maintenance greenlet makes or drops it, at its first run.
    first = start_collector()  # on, the default
    wait_until(lambda: database.query(METADATA_INDEX)[0][0], 30, "the metadata index made")
    first.terminate()
    collector = start_collector({"COLLECTOR_METADATA_INDEX": "off"})
    wait_until(lambda: not database.query(METADATA_INDEX)[0][0], 30,
               "the metadata index dropped")
    events = stored_events(collector, database, 20)
    assert ids(collector, metadata='{"page": "/p/3"}') == newest_first(
        [e for e in events if e["metadata"]["page"] == "/p/3"])


def test_filters_and_newest_first(collector, database):
    events = stored_events(collector, database, 60)
    assert ids(collector) == newest_first(events)
    assert ids(collector, user_id=2) == newest_first([e for e in events if e["user_id"] == 2])
    assert ids(collector, metadata='{"page": "/p/3"}') == newest_first(
        [e for e in events if e["metadata"]["page"] == "/p/3"])
    assert ids(collector, metadata='{"nested": {"even": true}}', user_id=1) == newest_first(
        [e for e in events if e["user_id"] == 1 and e["metadata"]["nested"]["even"]])
    since, until = BASE + datetime.timedelta(minutes=10), BASE + datetime.timedelta(minutes=20)
    assert ids(collector, **{"from": since.isoformat(), "to": until.isoformat()}) == newest_first(
        events[10:20])  # from inclusive, to exclusive
    # An offset other than UTC, and a "+" sent unencoded (read as a space by URL decoding).
    shifted = (since.astimezone(datetime.timezone(datetime.timedelta(hours=5, minutes=30)))
               .isoformat())
    assert ids(collector, **{"from": shifted, "to": until.isoformat()}) == newest_first(
        events[10:20])
    status, body = get_json(f"{collector.url}/events?from={shifted}")
    assert status == 200 and len(body["events"]) == 50, body
    assert ids(collector, user_id=99) == []
    status, body = get_json(url_of(collector, "/events", limit=5000))
    assert status == 200 and body["limit"] == 1000  # lowered to the cap, not refused


def test_an_event_reads_back_as_stored(collector, database):
    event = make_event(user_id=9223372036854775807, timestamp="2024-05-01T12:30:00.123456+05:30",
                       metadata={"caf\u00e9": [1, 2.5, None, True], "deep": {"x": "y"}})
    assert post_json(collector.url + "/event", event).status == 202
    wait_until(lambda: database.count() == 1, 10, "the row")
    status, body = get_json(collector.url + "/events")
    assert status == 200
    (read,) = body["events"]
    assert read["event_id"] == event["event_id"]
    assert read["user_id"] == 9223372036854775807
    assert read["timestamp"] == "2024-05-01T07:00:00.123456+00:00"
    assert read["metadata"] == event["metadata"]
    assert datetime.datetime.fromisoformat(read["received_at"]).tzinfo is not None
    assert body["next"] is None


def test_pages_hold_still_while_events_arrive(collector, database):
    events = stored_events(collector, database, 250)
    pages, cursor, older = [], None, []
    for _ in range(20):  # bounded: 250 events in pages of 40 take 7
        params = {"limit": 40, **({"cursor": cursor} if cursor else {})}
        status, body = get_json(url_of(collector, "/events", **params))
        assert status == 200, body
        pages.append([e["event_id"] for e in body["events"]])
        cursor = body["next"]
        if cursor is None:
            break
        # Between pages: an event newer than all, one at an instant already paged past,
        # and one older than all, which a later page must show.
        arrivals = [make_event(timestamp="2025-01-01T00:00:00Z"),
                    make_event(timestamp=events[-1 - len(pages)]["timestamp"]),
                    make_event(timestamp="2024-04-30T00:00:00Z")]
        older.append(arrivals[-1]["event_id"])
        for event in arrivals:
            assert post_json(collector.url + "/event", event).status == 202
        wait_until(lambda: {e["event_id"] for e in arrivals} <= set(database.event_ids()), 10,
                   "the arrivals")
    read = [event_id for page in pages for event_id in page]
    assert [len(page) for page in pages] == [40] * 6 + [10 + 6]
    # Each event once, in order: the 250, then the older arrivals (same instant: by
    # event_id, descending), and none of those at or after an instant already read.
    assert read == newest_first(events) + sorted(older, reverse=True)


def test_counts_by_bucket_user_and_key(start_collector, database):
    collector = start_collector({"COLLECTOR_ROLLUP_KEYS": "page"})
    wait_until(lambda: database.query("SELECT to_regclass('rollup_keys') IS NOT NULL")[0][0]
               and database.query("SELECT count(*) FROM rollup_keys")[0][0] == 1, 30,
               "the rollup key")
    events = stored_events(collector, database, 150)  # 00:00 to 02:29, one a minute
    status, body = get_json(url_of(collector, "/counts", bucket="hour", **{
        "from": "2024-05-01T00:30:00Z", "to": "2024-05-01T02:00:00Z"}))
    assert status == 200, body
    assert body == {"bucket": "hour", "from": "2024-05-01T00:00:00+00:00",
                    "to": "2024-05-01T02:00:00+00:00",
                    "counts": [{"start": "2024-05-01T00:00:00+00:00", "count": 60},
                               {"start": "2024-05-01T01:00:00+00:00", "count": 60}]}
    status, body = get_json(url_of(collector, "/counts", bucket="day", user_id=2,
                                   **{"from": "2024-05-01T00:00:00Z"}))
    assert status == 200 and body["counts"] == [{"start": "2024-05-01T00:00:00+00:00",
                                                  "count": 50}], body
    status, body = get_json(url_of(collector, "/counts", bucket="day", key="page", **{
        "from": "2024-05-01T00:00:00Z", "to": "2024-05-02T00:00:00Z"}))
    assert status == 200, body
    assert sorted((c["value"], c["count"]) for c in body["counts"]) == [
        (f"/p/{i}", 30) for i in range(5)]
    assert body["truncated"] is False and body["counted_since"]
    minute = events[7]["timestamp"]
    status, body = get_json(url_of(collector, "/counts", bucket="minute", **{
        "from": minute, "to": events[9]["timestamp"]}))
    assert status == 200 and body["counts"] == [
        {"start": e["timestamp"].replace("Z", "+00:00"), "count": 1} for e in events[7:9]], body


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One collector for the refusals: they only read answers."""
    collector, _ = start_module_collector(postgres, tmp_path_factory,
                                          {"COLLECTOR_ROLLUP_KEYS": "page"})
    yield collector
    collector.terminate()


# (path, query string, the parameter the 400 names, its "limit" or None)
REFUSALS = [
    ("/events", "user_id=abc", "user_id", None),
    ("/events", "user_id=-1", "user_id", None),
    ("/events", "user_id=9223372036854775808", "user_id", None),
    ("/events", "user_id=", "user_id", None),
    ("/events", "from=yesterday", "from", None),
    ("/events", "to=2024-13-01T00:00:00Z", "to", None),
    ("/events", "from=2024-05-02T00:00:00Z&to=2024-05-01T00:00:00Z", "to", None),
    ("/events", "metadata=[1]", "metadata", None),
    ("/events", "metadata=%7Bnope", "metadata", None),
    ("/events", "metadata=" + urllib.parse.quote('{"x": "a\\u0000"}'), "metadata", None),
    ("/events", "metadata=" + urllib.parse.quote('{"x": 1e400}'), "metadata", None),
    ("/events", "metadata=" + urllib.parse.quote('{"x": "\\ud800"}'), "metadata", None),
    ("/events", "metadata=" + urllib.parse.quote(json.dumps({"x": "y" * 3000})), "metadata",
     "max_filter_bytes"),
    ("/events", "limit=0", "limit", None),
    ("/events", "limit=ten", "limit", None),
    ("/events", "cursor=abc", "cursor", None),
    ("/events", "cursor=WyJ4IiwieSJd", "cursor", None),  # ["x","y"]
    ("/events", "userId=1", "userId", None),
    ("/events", "user_id=1&user_id=2", "user_id", None),
    ("/counts", "bucket=week", "bucket", None),
    ("/counts", "key=country", "key", None),
    ("/counts", "key=page&user_id=1", "key", None),
    ("/counts", "bucket=minute&from=2024-01-01T00:00:00Z&to=2024-02-01T00:00:00Z", "from",
     "max_buckets"),
    ("/counts", "from=0001-01-01T00:00:00Z&to=0001-01-01T00:00:00Z", "to", None),
    ("/counts", "to=9999-12-31T23:59:59Z", "to", None),
    ("/counts", "since=2024-01-01T00:00:00Z", "since", None),
]


@pytest.mark.parametrize("path,query,field,limit", REFUSALS,
                         ids=[f"{p} {q[:40]}" for p, q, _, _ in REFUSALS])
def test_bad_parameters_are_400_naming_them(server, path, query, field, limit):
    status, body = get_json(f"{server.url}{path}?{query}")
    assert status == 400, body
    assert body["title"] and body["description"]
    assert body.get("field") == field, body
    assert body.get("limit") == limit, body


def test_no_refusal_was_a_500(server):
    status, _ = get_json(server.url + "/events?limit=1")
    assert status == 200
    assert "Traceback" not in server.output()


def test_unknown_methods_on_the_read_routes_are_405(server):
    assert request(server.url + "/events", "DELETE").status == 405
    assert request(server.url + "/counts", "POST", b"{}").status == 405


@pytest.mark.parametrize("seed", [1, 2])
def test_random_cursors_never_crash(server, seed):
    rng = random.Random(seed)
    for _ in range(20):
        junk = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_=")
                       for _ in range(rng.randrange(1, 80)))
        status, body = get_json(f"{server.url}/events?cursor={junk}")
        assert status == 400 and body["field"] == "cursor", body
