"""Every refusal is a 4xx JSON error naming the field or limit; never a 500, never stored."""

import gzip
import json
import re

import pytest

from tests.client import make_event, post_json, request
from tests.fixtures.collector import start_module_collector
from tests.polling import wait_until

VALID = make_event()
TS = "2024-05-01T12:00:00Z"


MARKER_USER = 777_001  # refused events carry it; no row may ever have it


def event_with(**fields) -> bytes:
    event = {"user_id": MARKER_USER, "timestamp": TS, "metadata": {"k": "v"}}
    event.update(fields)
    return json.dumps(event).encode()


def without(field: str) -> bytes:
    event = {"user_id": MARKER_USER, "timestamp": TS, "metadata": {}}
    del event[field]
    return json.dumps(event).encode()


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def raw_metadata(text: str) -> bytes:
    return ('{"user_id": %d, "timestamp": "%s", "metadata": %s}' % (MARKER_USER, TS, text)).encode()


# (case id, body, expected status, expected "field" or None, expected "limit" or None)
CASES = [
    ("malformed json", b'{"user_id": 1,', 400, None, None),
    ("trailing garbage", event_with() + b" x", 400, None, None),
    ("empty body", b"", 400, None, None),
    ("array instead of object", b"[1, 2]", 400, None, None),
    ("user_id boolean", event_with(user_id=True), 400, "user_id", None),
    ("user_id string", event_with(user_id="1"), 400, "user_id", None),
    ("user_id float", event_with(user_id=1.5), 400, "user_id", None),
    ("user_id negative", event_with(user_id=-1), 400, "user_id", None),
    ("user_id past bigint", event_with(user_id=2**63), 400, "user_id", None),
    ("user_id huge", event_with(user_id=10**40), 400, "user_id", None),
    ("user_id missing", without("user_id"), 400, "user_id", None),
    ("timestamp words", event_with(timestamp="yesterday"), 400, "timestamp", None),
    ("timestamp month 13", event_with(timestamp="2024-13-01T00:00:00Z"), 400, "timestamp", None),
    ("timestamp date only", event_with(timestamp="2024-05-01"), 400, "timestamp", None),
    ("timestamp number", event_with(timestamp=1714564800), 400, "timestamp", None),
    ("timestamp missing", without("timestamp"), 400, "timestamp", None),
    ("timestamp before year 1 in UTC", event_with(timestamp="0001-01-01T00:30:00+01:00"), 400,
     "timestamp", None),
    ("metadata array", event_with(metadata=[1]), 400, "metadata", None),
    ("metadata string", event_with(metadata="x"), 400, "metadata", None),
    ("metadata null", event_with(metadata=None), 400, "metadata", None),
    ("metadata missing", without("metadata"), 400, "metadata", None),
    ("unknown field", event_with(userId=1), 400, "userId", None),
    ("event_id not a uuid", event_with(event_id="nope"), 400, "event_id", None),
    ("NaN", raw_metadata('{"x": NaN}'), 400, None, None),
    ("Infinity", raw_metadata('{"x": Infinity}'), 400, None, None),
    ("number past double", raw_metadata('{"x": 1e400}'), 400, "metadata", "number"),
    ("nesting past the limit", raw_metadata(nested(33)), 400, "metadata", "max_metadata_depth"),
    ("nesting past the recursion limit", raw_metadata(nested(5000)), 400, "metadata",
     "max_metadata_depth"),
    ("NUL escape", raw_metadata('{"x": "a\\u0000b"}'), 400, "metadata", None),
    ("NUL escape in a key", raw_metadata('{"a\\u0000": 1}'), 400, "metadata", None),
    ("lone high surrogate", raw_metadata('{"x": "\\ud800"}'), 400, None, None),
    ("lone low surrogate", raw_metadata('{"x": "\\udc00 z"}'), 400, None, None),
    ("invalid utf-8", raw_metadata('{"x": "Q"}').replace(b"Q", b"\xff"), 400, None, None),
    ("utf-8 encoded surrogate", raw_metadata('{"x": "S"}').replace(b"S", b"\xed\xa0\x80"),
     400, None, None),
]


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One collector for the whole module: these tests only read answers."""
    collector, database = start_module_collector(postgres, tmp_path_factory, {"ACCESS_LOG": "1"})
    yield collector, database
    collector.terminate()


@pytest.mark.parametrize("name,body,status,field,limit", CASES, ids=[c[0] for c in CASES])
def test_refusal_names_the_field(server, name, body, status, field, limit):
    collector, _ = server
    answer = request(collector.url + "/event", "POST", body,
                     {"Content-Type": "application/json"})
    assert answer.status == status, answer.body
    assert isinstance(answer.body, dict), answer.body
    assert answer.body["title"] and answer.body["description"]
    assert answer.body.get("field") == field, answer.body
    if limit is not None:
        assert answer.body.get("limit") == limit, answer.body
    assert answer.headers["content-type"].startswith("application/json")


def test_body_over_the_limit_is_413(server):
    collector, _ = server
    body = raw_metadata(json.dumps({"pad": "x" * 70_000}))
    answer = request(collector.url + "/event", "POST", body, {"Content-Type": "application/json"})
    assert answer.status == 413
    assert answer.body["limit"] == "max_event_bytes"


def test_gzip_bomb_is_413_not_memory(server):
    collector, _ = server
    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")
    assert len(bomb) < 65_536
    answer = request(collector.url + "/event", "POST", bomb,
                     {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert answer.status == 413
    assert answer.body["limit"] == "max_event_bytes"
    assert "decompressed" in answer.body["description"]


def test_wrong_content_type_is_415(server):
    collector, _ = server
    answer = request(collector.url + "/event", "POST", event_with(),
                     {"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status == 415
    assert answer.body["limit"] == "content_type"


def test_unknown_encoding_is_415(server):
    collector, _ = server
    answer = request(collector.url + "/event", "POST", event_with(),
                     {"Content-Type": "application/json", "Content-Encoding": "br"})
    assert answer.status == 415


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405_json(server, method):
    collector, _ = server
    answer = request(collector.url + "/event", method)
    assert answer.status == 405
    assert answer.body["title"]


def test_unknown_path_is_404_json(server):
    collector, _ = server
    answer = request(collector.url + "/nope", "POST", b"{}")
    assert answer.status == 404
    assert answer.body["title"]


def test_escaped_backslash_before_u0000_is_not_nul(server):
    collector, database = server
    event = make_event(metadata={"path": "C:\\u0000dir"})  # a backslash, then "u0000dir"
    answer = post_json(collector.url + "/event", event)
    assert answer.status == 202, answer.body
    wait_until(lambda: event["event_id"] in database.event_ids(), 10, "the event's row")
    stored = database.query("SELECT metadata->>'path' FROM events WHERE event_id = %s",
                            (event["event_id"],))[0][0]
    assert stored == "C:\\u0000dir"


def test_refusals_stored_nothing_and_no_500(server):
    collector, database = server
    marker = make_event()
    assert post_json(collector.url + "/event", marker).status == 202
    wait_until(lambda: marker["event_id"] in database.event_ids(), 10, "the marker row")
    assert collector.health()["refused"] >= len(CASES)
    assert database.query("SELECT count(*) FROM events WHERE user_id = %s", (MARKER_USER,)) == [(0,)]
    statuses = re.findall(r'HTTP/1.1" (\d{3}) ', collector.output())
    assert statuses and not [s for s in statuses if s.startswith("5")]
    assert "Traceback" not in collector.output()
