"""Who may read through the shipped conf/nginx.conf: ingestion is public, stored data is not.

From an address outside the trusted networks (the test's copy trusts only 127.0.0.1, and
the client binds 127.0.0.2), events are taken and stored, while GET /events, /counts,
/metrics and /ready are a JSON 403 that never reaches the collector; from 127.0.0.1 they
answer. Read keys work in addition: with reads opened to every address, a read key is
what lets one in.
"""

import json

import pytest

from tests.client import Answer, connection_from, make_event, post_json, request
from tests.fixtures.collector import start_module_collector
from tests.fixtures.nginx import trust_only
from tests.polling import wait_until

INSIDE = "127.0.0.1"
OUTSIDE = "127.0.0.2"  # loopback too, but not in the test's trusted networks
READ_KEY = "rk_dashboard_51e7"
STORE_TIMEOUT = 10
READS = ("/events", "/counts", "/metrics", "/ready")


def send(url: str, source: str, method: str = "GET", document: object = None,
         headers: dict | None = None) -> Answer:
    """Send one request (POST document, if given) from the local address source."""
    conn = connection_from(url, source)
    try:
        if document is not None:
            return post_json(url, document, headers, conn)
        return request(url, method, None, headers, conn)
    finally:
        conn.close()


def assert_forbidden(answer: Answer) -> None:
    assert answer.status == 403, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    assert answer.body == {"title": "Forbidden", "description": answer.body["description"],
                           "limit": "trusted_networks"}, answer


@pytest.fixture(scope="module")
def open_reads(postgres, tmp_path_factory):
    """A collector without read keys (the default), so that only nginx guards reads."""
    collector, database = start_module_collector(postgres, tmp_path_factory,
                                                 {"ACCESS_LOG": "1"})
    yield collector, database
    collector.terminate()


def test_outsiders_send_events_but_read_nothing(open_reads, start_nginx):
    collector, database = open_reads
    nginx = start_nginx(collector.port, edit=lambda site: trust_only(site, [INSIDE]))
    single, batch = make_event(), [make_event(), make_event()]
    answer = send(nginx.url + "/event", OUTSIDE, document=single)
    assert answer.status == 202, answer
    answer = send(nginx.url + "/events", OUTSIDE, document=batch)
    assert answer.status == 202 and len(answer.body["accepted"]) == 2, answer
    sent = {e["event_id"] for e in [single, *batch]}
    wait_until(lambda: sent <= set(database.event_ids()), STORE_TIMEOUT,
               "the outsider's three events in PostgreSQL")
    for path in ("/event", "/events"):
        preflight = send(nginx.url + path, OUTSIDE, "OPTIONS", headers={
            "Origin": "https://shop.example.com", "Access-Control-Request-Method": "POST"})
        assert preflight.status == 200, (path, preflight)
    assert send(nginx.url + "/health", OUTSIDE).status == 200

    served_before = collector.output().count('"GET /events')
    for path in READS:
        answer = send(nginx.url + path, OUTSIDE)
        assert_forbidden(answer)
        assert single["event_id"] not in json.dumps(answer.body)
        assert send(nginx.url + path, OUTSIDE, "HEAD").status == 403, path
    # With a query string too, and with a key: nginx refuses before any key is looked at.
    assert_forbidden(send(nginx.url + "/events?user_id=1", OUTSIDE,
                          headers={"X-API-Key": READ_KEY}))
    assert collector.output().count('"GET /events') == served_before  # never reached it

    # From a trusted address, the same reads answer.
    events = send(nginx.url + "/events", INSIDE)
    assert events.status == 200, events
    assert {e["event_id"] for e in events.body["events"]} == sent
    counts = send(nginx.url + "/counts?bucket=day&from=2024-05-01T00:00:00Z"
                  "&to=2024-05-02T00:00:00Z", INSIDE)
    assert counts.status == 200, counts
    assert sum(bucket["count"] for bucket in counts.body["counts"]) == 3
    metrics = send(nginx.url + "/metrics", INSIDE)
    assert metrics.status == 200 and "firehose" in metrics.body, metrics
    assert send(nginx.url + "/ready", INSIDE).status == 200


def test_the_shipped_networks_trust_all_of_loopback(open_reads, start_nginx):
    collector, _ = open_reads
    nginx = start_nginx(collector.port)  # as shipped: 127.0.0.0/8 and the private ranges
    assert send(nginx.url + "/events", OUTSIDE).status == 200


@pytest.fixture
def keyed_reads(postgres, tmp_path_factory):
    """A collector with a read key; it stops after the test's nginx (function-scoped)."""
    collector, database = start_module_collector(postgres, tmp_path_factory,
                                                 {"COLLECTOR_READ_KEYS": READ_KEY})
    yield collector, database
    collector.terminate()


def open_to_all(site: str) -> str:
    """Return the site with reads open to any address (`default 0;`), as the conf describes."""
    site = trust_only(site, [INSIDE])
    assert site.count("    default         1;\n") == 1
    return site.replace("    default         1;\n", "    default         0;\n")


def test_read_keys_let_a_dashboard_read_from_anywhere(keyed_reads, start_nginx):
    # The operator's choice the conf describes: reads open to any address, guarded by
    # COLLECTOR_READ_KEYS in the collector.
    collector, database = keyed_reads
    nginx = start_nginx(collector.port, edit=open_to_all)
    event = make_event()
    assert send(nginx.url + "/event", OUTSIDE, document=event).status == 202
    wait_until(lambda: database.event_ids() == [event["event_id"]], STORE_TIMEOUT, "the event")
    for path in ("/events", "/counts"):
        refused = send(nginx.url + path, OUTSIDE)
        assert refused.status == 401 and refused.body["limit"] == "read_keys", refused
        keyed = send(nginx.url + path, OUTSIDE, headers={"Authorization": f"Bearer {READ_KEY}"})
        assert keyed.status == 200, keyed
    assert send(nginx.url + "/events", INSIDE).status == 401  # keys apply inside too
