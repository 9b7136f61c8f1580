"""Read keys (COLLECTOR_READ_KEYS): GET /events and /counts need a secret key of their own.

A write key is public (it ships in pages and apps): it must never open a read, and a read
key must never open a write. Checked on real gunicorn, without nginx in front.
"""

import base64

import pytest

from collector.settings import Settings, SettingsError
from tests.client import make_event, post_json, request
from tests.fixtures.collector import start_module_collector
from tests.polling import wait_until

WRITE_KEY = "wk_live_3f9a"
READ_KEYS = "rk_secret_8c21e0,rk_secret_47d9b3"
READ_KEY = "rk_secret_47d9b3"
READS = ("/events?limit=1000", "/counts?bucket=day&from=2024-05-01T00:00:00Z"
         "&to=2024-05-02T00:00:00Z")


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:".encode()).decode()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One collector with write and read keys, and one event stored, for the module."""
    collector, database = start_module_collector(
        postgres, tmp_path_factory,
        {"COLLECTOR_API_KEYS": WRITE_KEY, "COLLECTOR_READ_KEYS": READ_KEYS})
    event = make_event()
    assert post_json(collector.url + "/event", event, {"X-API-Key": WRITE_KEY}).status == 202
    wait_until(lambda: database.event_ids() == [event["event_id"]], 10, "the stored event")
    yield collector, database, event
    collector.terminate()


@pytest.mark.parametrize("headers", [
    {},
    {"X-API-Key": ""},
    {"X-API-Key": "rk_secret_8c21e"},
    {"Authorization": "Bearer wrong"},
    {"X-API-Key": WRITE_KEY},
    {"Authorization": f"Bearer {WRITE_KEY}"},
    {"Authorization": basic(WRITE_KEY)},
    {"X-API-Key": READ_KEYS},
    {"X-API-Key": "cl\u00e9"},
], ids=["none", "empty", "prefix", "wrong bearer", "write key", "write key as bearer",
        "write key as basic", "both keys", "latin-1 key"])
def test_a_read_without_a_read_key_is_401_and_returns_nothing(server, headers):
    collector, _, event = server
    for path in READS:
        answer = request(collector.url + path, headers=headers)
        assert answer.status == 401, (path, answer)
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert answer.body["title"] == "Unauthorized" and answer.body["limit"] == "read_keys"
        assert set(answer.body) == {"title", "description", "limit"}, answer.body
        assert event["event_id"] not in str(answer.body)


@pytest.mark.parametrize("headers", [
    {"X-API-Key": READ_KEY},
    {"Authorization": "Bearer rk_secret_8c21e0"},
    {"Authorization": basic(READ_KEY)},
], ids=["header", "bearer", "basic"])
def test_a_read_key_reads(server, headers):
    collector, _, event = server
    events, counts = (request(collector.url + path, headers=headers) for path in READS)
    assert events.status == 200, events
    assert [e["event_id"] for e in events.body["events"]] == [event["event_id"]]
    assert counts.status == 200, counts
    assert sum(bucket["count"] for bucket in counts.body["counts"]) == 1


@pytest.mark.parametrize("headers", [
    {"X-API-Key": READ_KEY},
    {"Authorization": f"Bearer {READ_KEY}"},
    {"Authorization": basic(READ_KEY)},
], ids=["header", "bearer", "basic"])
def test_a_read_key_never_writes(server, headers):
    collector, database, _ = server
    refused = [make_event(), make_event()]
    answers = [post_json(collector.url + "/event", refused[0], headers),
               post_json(collector.url + "/events", [refused[1]], headers)]
    for answer in answers:
        assert answer.status == 401, answer
        assert answer.body["limit"] == "api_keys"
    marker = make_event()
    assert post_json(collector.url + "/event", marker, {"X-API-Key": WRITE_KEY}).status == 202
    wait_until(lambda: marker["event_id"] in database.event_ids(), 10, "a later event")
    assert not {e["event_id"] for e in refused} & set(database.event_ids())


def test_openapi_documents_the_read_key_and_other_endpoints_stay_open(server):
    collector, _, _ = server
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert request(collector.url + path).status == 200, path
    document = request(collector.url + "/openapi.json").body
    schemes = document["components"]["securitySchemes"]
    for path in ("/events", "/counts"):
        read = document["paths"][path]["get"]
        named = {name for option in read["security"] for name in option}
        assert named == {"readKey", "readBearer", "readBasic"}, path
        assert "401" in read["responses"]
    assert schemes["readKey"] == {**schemes["writeKey"], "description": schemes["readKey"]
                                  ["description"]}  # the same header, another key
    output = collector.output()
    assert READ_KEY not in output and WRITE_KEY not in output


def test_a_write_key_cannot_also_be_a_read_key():
    with pytest.raises(SettingsError, match="COLLECTOR_READ_KEYS='\\*\\*\\*'"):
        Settings.from_environ({"COLLECTOR_API_KEYS": "shared-1,wk",
                               "COLLECTOR_READ_KEYS": "rk,shared-1"}, require_database=False)
    settings = Settings.from_environ({"COLLECTOR_READ_KEYS": "rk-1,rk-2"},
                                     require_database=False)
    assert settings.read_keys == ("rk-1", "rk-2")
    assert "rk-1" not in repr(settings) and "read_keys=('***', '***')" in repr(settings)
