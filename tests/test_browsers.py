"""What browsers send, through real gunicorn: gzip bodies, sendBeacon's text/plain, and CORS."""

import gzip
import json

import pytest

from tests.client import make_event, post_json, request
from tests.polling import wait_until

SHOP = "https://shop.example.com"
LOCAL = "http://localhost:3000"
ELSEWHERE = "https://evil.example.net"
BEACON = {"Content-Type": "text/plain;charset=UTF-8"}  # what navigator.sendBeacon(url, string) sends
GZIP_JSON = {"Content-Type": "application/json", "Content-Encoding": "gzip"}


def preflight(url: str, origin: str) -> dict:
    answer = request(url, "OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert answer.status == 200, answer.body
    return answer.headers


def test_gzip_body_on_event_and_events(collector, database):
    single = make_event(metadata={"page": "/caf\u00e9", "n": 1})
    answer = request(collector.url + "/event", "POST", gzip.compress(json.dumps(single).encode()),
                     GZIP_JSON)
    assert answer.status == 202, answer.body
    batch = [make_event() for _ in range(50)]
    ndjson = b"\n".join(json.dumps(e).encode() for e in batch)
    answer = request(collector.url + "/events", "POST", gzip.compress(ndjson),
                     {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"})
    assert answer.status == 202 and len(answer.body["accepted"]) == 50, answer.body
    expected = {single["event_id"]} | {e["event_id"] for e in batch}
    wait_until(lambda: set(database.event_ids()) == expected, 10, "51 rows")
    stored = database.query("SELECT metadata->>'page' FROM events WHERE event_id = %s",
                            (single["event_id"],))
    assert stored == [("/caf\u00e9",)]


def test_corrupt_gzip_is_400(collector, database):
    body = gzip.compress(json.dumps(make_event()).encode())
    for path in ("/event", "/events"):
        answer = request(collector.url + path, "POST", body[:-12], GZIP_JSON)  # truncated
        assert answer.status == 400 and "gzip" in answer.body["description"], answer.body
        answer = request(collector.url + path, "POST", b"not gzip at all", GZIP_JSON)
        assert answer.status == 400 and "gzip" in answer.body["description"], answer.body


def test_beacon_text_plain_is_accepted(collector, database):
    single = make_event()
    answer = request(collector.url + "/event", "POST", json.dumps(single).encode(), BEACON)
    assert answer.status == 202, answer.body
    batch = [make_event(), make_event()]
    answer = request(collector.url + "/events", "POST", json.dumps(batch).encode(), BEACON)
    assert answer.status == 202 and len(answer.body["accepted"]) == 2, answer.body
    expected = {single["event_id"]} | {e["event_id"] for e in batch}
    wait_until(lambda: set(database.event_ids()) == expected, 10, "the beacons' rows")


def test_cors_is_off_by_default(collector, database):
    headers = preflight(collector.url + "/event", SHOP)
    assert "access-control-allow-origin" not in headers
    answer = post_json(collector.url + "/event", make_event(), {"Origin": SHOP})
    assert answer.status == 202
    assert "access-control-allow-origin" not in answer.headers


@pytest.fixture
def cors_collector(start_collector):
    return start_collector({"COLLECTOR_CORS_ORIGINS": f"{SHOP}, {LOCAL}"}, workers=1)


@pytest.mark.parametrize("path", ["/event", "/events"])
def test_preflight_of_an_allowed_origin(cors_collector, database, path):
    headers = preflight(cors_collector.url + path, LOCAL)
    assert headers["access-control-allow-origin"] == LOCAL
    assert "POST" in headers["access-control-allow-methods"]
    assert "content-type" in headers["access-control-allow-headers"]
    assert int(headers["access-control-max-age"]) > 0
    assert "Origin" in headers["vary"]
    assert "access-control-allow-credentials" not in headers


def test_answers_to_an_allowed_origin_carry_cors_headers(cors_collector, database):
    event = make_event()
    answer = post_json(cors_collector.url + "/event", event, {"Origin": SHOP})
    assert answer.status == 202
    assert answer.headers["access-control-allow-origin"] == SHOP
    assert "Origin" in answer.headers["vary"]
    assert "Retry-After" in answer.headers["access-control-expose-headers"]
    refused = post_json(cors_collector.url + "/event", make_event(user_id=-1), {"Origin": SHOP})
    assert refused.status == 400  # a page can read why its event was refused
    assert refused.headers["access-control-allow-origin"] == SHOP
    wait_until(lambda: database.event_ids() == [event["event_id"]], 10, "the event's row")


def test_another_origin_gets_no_cors_headers(cors_collector, database):
    assert "access-control-allow-origin" not in preflight(cors_collector.url + "/event", ELSEWHERE)
    answer = post_json(cors_collector.url + "/event", make_event(), {"Origin": ELSEWHERE})
    assert answer.status == 202  # CORS is the browser's rule: it will hide this answer
    assert "access-control-allow-origin" not in answer.headers


def test_any_origin(start_collector, database):
    collector = start_collector({"COLLECTOR_CORS_ORIGINS": "*"}, workers=1)
    assert preflight(collector.url + "/events", ELSEWHERE)["access-control-allow-origin"] == "*"
    answer = post_json(collector.url + "/events", [make_event()], {"Origin": SHOP})
    assert answer.status == 202 and answer.headers["access-control-allow-origin"] == "*"
