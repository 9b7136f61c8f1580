"""The shipped conf/nginx.conf's rate limits, with real nginx in front of real gunicorn.

The test's copy lowers the rates to one request a minute, so that only the burst passes
while a test runs (well under a minute) and the counts are exact: burst + 1 requests get
202, the next get a JSON 429 with Retry-After that names the limit, and nothing of them is
stored or even reaches the collector. A second client (another address, another key) keeps
its own allowance, and /events counts requests, not the events in them.
"""

import re

import pytest

from tests.client import Answer, connection_from, make_event, post_json
from tests.fixtures.collector import PROJECT_DIR, start_module_collector
from tests.fixtures.nginx import SITE_CONF, set_rates
from tests.polling import wait_until

ONE_A_MINUTE = "1r/m"  # refills one request per minute: none while a test runs
RATES = {  # zone: (rate, burst); a client gets burst + 1 requests
    "firehose_client_event": (ONE_A_MINUTE, 9),
    "firehose_key_event": (ONE_A_MINUTE, 2),
    "firehose_client_batch": (ONE_A_MINUTE, 2),
    "firehose_key_batch": (ONE_A_MINUTE, 1),
}
FIRST, SECOND = "127.0.0.1", "127.0.0.2"
STORE_TIMEOUT = 15
BATCH_EVENTS = 100


def send(url: str, source: str, document: object, headers: dict | None = None) -> Answer:
    """POST one JSON document from the local address source, on a connection of its own."""
    conn = connection_from(url, source)
    try:
        return post_json(url, document, headers, conn)
    finally:
        conn.close()


def assert_rate_limited(answer: Answer, limit: str) -> None:
    assert answer.status == 429, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    assert answer.headers["retry-after"] == "1", answer
    assert answer.body == {"title": "Too many requests",
                           "description": answer.body["description"], "limit": limit}, answer


class Ledger:
    """The events a test sent, by whether they were answered 202."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.refused: set[str] = set()

    def post(self, url: str, source: str, events: list[dict], headers: dict | None = None,
             batch: bool = False) -> Answer:
        answer = send(url + ("/events" if batch else "/event"), source,
                      events if batch else events[0], headers)
        ids = {e["event_id"] for e in events}
        (self.accepted if answer.status == 202 else self.refused).update(ids)
        return answer

    def check_stored(self, database) -> None:
        """Wait for every accepted event in PostgreSQL; then no refused one may be there."""
        wait_until(lambda: self.accepted <= set(database.event_ids()), STORE_TIMEOUT,
                   f"the {len(self.accepted)} accepted events in PostgreSQL")
        assert self.refused and not self.refused & set(database.event_ids())


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One collector for the module (no write keys: nginx counts keys as sent)."""
    collector, database = start_module_collector(postgres, tmp_path_factory,
                                                 {"ACCESS_LOG": "1"})
    yield collector, database
    collector.terminate()


@pytest.fixture
def limited(server, start_nginx):
    """nginx with the test's rates (fresh zones) in front of the module's collector."""
    collector, database = server
    nginx = start_nginx(collector.port, edit=lambda site: set_rates(site, RATES))
    return nginx, collector, database


def posts_reaching(collector, path: str) -> int:
    """Return how many POSTs of path gunicorn's access log shows."""
    return collector.output().count(f'"POST {path} HTTP/1.1"')


def test_a_client_over_its_rate_gets_429_and_another_address_does_not(limited):
    nginx, collector, database = limited
    ledger, before = Ledger(), posts_reaching(collector, "/event")
    per_client = RATES["firehose_client_event"][1] + 1
    for _ in range(per_client):
        answer = ledger.post(nginx.url, FIRST, [make_event()])
        assert answer.status == 202, answer
    for _ in range(3):
        assert_rate_limited(ledger.post(nginx.url, FIRST, [make_event()]), "rate_per_client")
    for _ in range(per_client):  # another address has its own allowance
        answer = ledger.post(nginx.url, SECOND, [make_event()])
        assert answer.status == 202, answer
    assert_rate_limited(ledger.post(nginx.url, SECOND, [make_event()]), "rate_per_client")
    ledger.check_stored(database)
    assert len(ledger.accepted) == 2 * per_client and len(ledger.refused) == 4
    # The refusals never reached gunicorn: its access log shows the accepted POSTs only.
    wait_until(lambda: posts_reaching(collector, "/event") - before == 2 * per_client, 5,
               f"gunicorn's access log to show {2 * per_client} POST /event")


def test_a_key_over_its_rate_gets_429_and_another_key_does_not(limited):
    nginx, _, database = limited
    ledger = Ledger()
    per_key = RATES["firehose_key_event"][1] + 1
    first_key, second_key = {"X-API-Key": "wk_app_one"}, {"Authorization": "Bearer wk_app_two"}
    for _ in range(per_key):
        assert ledger.post(nginx.url, FIRST, [make_event()], first_key).status == 202
    for _ in range(2):
        assert_rate_limited(ledger.post(nginx.url, FIRST, [make_event()], first_key),
                            "rate_per_key")
    # The same address, another key, or no key: the address is still under its own rate.
    for _ in range(per_key):
        assert ledger.post(nginx.url, FIRST, [make_event()], second_key).status == 202
    assert ledger.post(nginx.url, FIRST, [make_event()]).status == 202
    # The key is limited wherever it comes from.
    assert_rate_limited(ledger.post(nginx.url, SECOND, [make_event()], first_key),
                        "rate_per_key")
    # Batches have their own per-key rate.
    per_key_batches = RATES["firehose_key_batch"][1] + 1
    for _ in range(per_key_batches):
        answer = ledger.post(nginx.url, FIRST, [make_event()], first_key, batch=True)
        assert answer.status == 202, answer
    assert_rate_limited(ledger.post(nginx.url, FIRST, [make_event()], first_key, batch=True),
                        "rate_per_key")
    ledger.check_stored(database)
    assert len(ledger.accepted) == 2 * per_key + 1 + per_key_batches


def test_batches_count_once_whatever_their_size(limited):
    nginx, _, database = limited
    ledger = Ledger()
    per_client_batches = RATES["firehose_client_batch"][1] + 1
    for _ in range(per_client_batches):  # far more events than /event's allowance
        batch = [make_event() for _ in range(BATCH_EVENTS)]
        answer = ledger.post(nginx.url, FIRST, batch, batch=True)
        assert answer.status == 202 and len(answer.body["accepted"]) == BATCH_EVENTS, answer
    refused = ledger.post(nginx.url, FIRST, [make_event() for _ in range(BATCH_EVENTS)],
                          batch=True)
    assert_rate_limited(refused, "rate_per_client")
    # /event keeps its own allowance: batches did not use it up.
    assert ledger.post(nginx.url, FIRST, [make_event()]).status == 202
    ledger.check_stored(database)
    assert len(ledger.accepted) == per_client_batches * BATCH_EVENTS + 1
    assert len(ledger.refused) == BATCH_EVENTS


def test_the_readme_states_the_shipped_limits():
    conf = SITE_CONF.read_text()
    rates = dict(re.findall(r"^limit_req_zone\s+\S+\s+zone=(\w+):\S+\s+rate=(\d+)r/s;",
                            conf, re.MULTILINE))
    bursts = dict(re.findall(r"^\s*limit_req\s+zone=(\w+)\s+burst=(\d+)\s+nodelay;", conf,
                             re.MULTILINE))
    assert set(rates) == set(bursts) == set(RATES), (rates, bursts)
    readme = (PROJECT_DIR / "README.md").read_text()
    for who, limit in (("client", "per client address (`rate_per_client`)"),
                       ("key", "per write key (`rate_per_key`)")):
        event, batch = (f"{rates[f'firehose_{who}_{route}']}/s, burst "
                        f"{bursts[f'firehose_{who}_{route}']}" for route in ("event", "batch"))
        assert f"| {limit} | {event} | {batch} |" in readme, (limit, event, batch)
