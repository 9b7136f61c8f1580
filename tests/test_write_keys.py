"""Write keys (COLLECTOR_API_KEYS): event POSTs need a key; a missing or wrong one is a 401."""

import base64

import falcon.testing
import pytest

from collector.app import create_app
from collector.settings import Settings
from tests.client import make_event, post_json, request
from tests.fixtures.collector import Collector
from tests.polling import wait_until

KEYS = "key-one-8f3a,key-two-c41d"
ORIGIN = "https://shop.example.com"


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One collector with write keys for the module; each test checks its own events."""
    from tests.fixtures.postgres import TestDatabase  # a class named Test* is not a test here
    database = TestDatabase(postgres)
    database.reset()
    collector = Collector(database.url, tmp_path_factory.mktemp("spool") / "spool",
                          {"COLLECTOR_API_KEYS": KEYS, "COLLECTOR_CORS_ORIGINS": ORIGIN,
                           "ACCESS_LOG": "1"}, 1)
    collector.start()
    yield collector, database
    collector.terminate()


@pytest.mark.parametrize("headers", [
    {"X-API-Key": "key-one-8f3a"},
    {"X-API-Key": " key-two-c41d "},
    {"Authorization": "Bearer key-two-c41d"},
    {"Authorization": "bearer key-one-8f3a"},
    {"Authorization": basic("key-one-8f3a")},
    {"Authorization": basic("key-two-c41d", "ignored")},
], ids=["header", "header with spaces", "bearer", "bearer lower case", "basic", "basic+password"])
def test_a_valid_key_is_accepted(server, headers):
    keyed, database = server
    event = make_event()
    answer = post_json(keyed.url + "/event", event, headers)
    assert answer.status == 202, answer.body
    batch = [make_event(), make_event()]
    assert post_json(keyed.url + "/events", batch, headers).status == 202
    expected = {event["event_id"]} | {e["event_id"] for e in batch}
    wait_until(lambda: expected <= set(database.event_ids()), 10, "the three rows")


@pytest.mark.parametrize("headers", [
    {},
    {"X-API-Key": ""},
    {"X-API-Key": "key-one-8f3"},
    {"X-API-Key": "key-one-8f3a,key-two-c41d"},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": "Token key-one-8f3a"},
    {"Authorization": "Basic !!not-base64!!"},
    {"Authorization": basic("wrong", "key-one-8f3a")},
    {"X-API-Key": "cl\u00e9-\u00fc"},  # sent as latin-1 bytes
    {"X-API-Key": "cl\u00e9".encode("utf-8")},  # sent as UTF-8 bytes
    {"Authorization": b"Bearer \xff\xfe"},
], ids=["none", "empty", "prefix", "both keys", "bearer alone", "wrong bearer", "other scheme",
        "bad base64", "key as password", "latin-1 key", "utf-8 key", "binary bearer"])
def test_a_missing_or_wrong_key_is_401_json(server, headers):
    keyed, database = server
    accepted = keyed.health()["accepted"]
    sent = []
    for path, body in (("/event", make_event()), ("/events", [make_event()])):
        sent += [e["event_id"] for e in (body if isinstance(body, list) else [body])]
        answer = post_json(keyed.url + path, body, headers)
        assert answer.status == 401, answer.body
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.body["limit"] == "api_keys" and answer.body["title"] == "Unauthorized"
    assert keyed.health()["accepted"] == accepted
    marker = make_event()
    assert post_json(keyed.url + "/event", marker, {"X-API-Key": "key-one-8f3a"}).status == 202
    wait_until(lambda: marker["event_id"] in database.event_ids(), 10, "a later event")
    assert not set(sent) & set(database.event_ids())


def test_reporting_endpoints_and_preflight_stay_open(server):
    keyed, _ = server
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert request(keyed.url + path).status == 200, path
    document = request(keyed.url + "/openapi.json").body
    for path in ("/event", "/events"):  # the document says a key is needed, and how
        schemes = {name for option in document["paths"][path]["post"]["security"]
                   for name in option}
        assert schemes == {"writeKey", "bearer", "basic"}
    preflight = request(keyed.url + "/event", "OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-api-key"})
    assert preflight.status == 200
    assert "x-api-key" in preflight.headers["access-control-allow-headers"]
    refused = post_json(keyed.url + "/event", make_event(), {"Origin": ORIGIN})
    assert refused.status == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN  # the page can read why


def test_keys_never_reach_the_logs(server):
    keyed, _ = server
    assert post_json(keyed.url + "/event", make_event(),
                     {"Authorization": basic("key-one-8f3a")}).status == 202
    assert post_json(keyed.url + "/event", make_event(),
                     {"X-API-Key": "key-two-c41d"}).status == 202
    output = keyed.output()
    assert '"POST /event HTTP/1.1" 202' in output  # the access log is on
    assert "key-one-8f3a" not in output and "key-two-c41d" not in output


def test_a_key_no_str_comparison_could_take_is_401_in_process(tmp_path):
    # A test client passes any str, even one WSGI could not carry: still a 401, no TypeError.
    # No request gets past the key, so the database is never reached.
    app = create_app(Settings(database_url="postgresql://unused/none", spool_dir=str(tmp_path),
                              api_keys=("key-one-8f3a",)))
    client = falcon.testing.TestClient(app)
    for value in ("\U0001F511", "key-one-8f3a\udc80", "\u00e9"):
        for header in ("X-API-Key", "Authorization"):
            given = value if header == "X-API-Key" else "Bearer " + value
            answer = client.simulate_post("/event", json=make_event(), headers={header: given})
            assert answer.status_code == 401, (header, value, answer.text)
