"""Events from a real headless Chromium on another origin: beacons, keyed fetch through CORS,
a refused origin, and the browser snippet (conf/browser/firehose.js) batching and retrying."""

import json

import pytest

from tests.client import make_event
from tests.fixtures.collector import Collector, start_module_collector
from tests.polling import wait_until
from tests.test_metrics import scrape, value

WRITE_KEY = "wk_browser_5b1e"
STORED_TIMEOUT = 15  # seconds for events to reach PostgreSQL


@pytest.fixture(scope="module")
def collectors(postgres, tmp_path_factory, page_origins):
    """Two collectors letting the first page origin (not the second) send: open and keyed."""
    allowed = page_origins[0].origin
    open_collector, database = start_module_collector(
        postgres, tmp_path_factory, {"COLLECTOR_CORS_ORIGINS": allowed})
    # Started without start_module_collector, which would empty the tables under the first.
    keyed = Collector(database.url, tmp_path_factory.mktemp("spool") / "spool",
                      {"COLLECTOR_CORS_ORIGINS": allowed, "COLLECTOR_API_KEYS": WRITE_KEY}, 1)
    keyed.start()
    yield open_collector, keyed, database
    for collector in (open_collector, keyed):
        collector.terminate()


@pytest.fixture(scope="module")
def browser(collectors, chromium):
    """Chromium, closed before the collectors stop: an idle keep-alive connection of its
    would keep a gevent worker from exiting until gunicorn's timeout (gunicorn#2303)."""
    yield chromium
    chromium.close()


def stored_counts(database, event_ids: list[str]) -> dict[str, int]:
    """Return how many rows of events hold each of these event_ids (absent ones left out)."""
    rows = database.query("SELECT event_id::text, count(*) FROM events "
                          "WHERE event_id = ANY(%s::uuid[]) GROUP BY 1", (list(event_ids),))
    return dict(rows)


def wait_stored_once(database, event_ids: list[str]) -> None:
    """Wait until every one of event_ids is stored, then check each is stored once."""
    wait_until(lambda: len(stored_counts(database, event_ids)) == len(event_ids),
               STORED_TIMEOUT, f"{len(event_ids)} events stored")
    assert stored_counts(database, event_ids) == {i: 1 for i in event_ids}


def posts(collector: Collector, route: str, method: str = "POST") -> float:
    """Return how many requests of this route and method the collector has answered."""
    return value(scrape(collector.url), "firehose_http_requests_total", route=route,
                 method=method)


def beacon(url: str, document: object) -> str:
    """Return JavaScript that sends a JSON document with navigator.sendBeacon (text/plain)."""
    return f"navigator.sendBeacon({json.dumps(url)}, {json.dumps(json.dumps(document))})"


def test_send_beacon_from_an_allowed_origin(browser, page_origins, collectors):
    open_collector, _, database = collectors
    page = browser.open_page(page_origins[0].origin + "/blank.html")
    single, batch = make_event(), [make_event(), make_event()]
    queued = page.evaluate(f"[{beacon(open_collector.url + '/event', single)}, "
                           f"{beacon(open_collector.url + '/events', batch)}]")
    assert queued == [True, True]  # the browser took them (text/plain: no preflight)
    wait_stored_once(database, [single["event_id"]] + [e["event_id"] for e in batch])
    page.close()


def keyed_fetch(url: str, key: str, event: dict) -> str:
    """Return JavaScript that POSTs an event with fetch keepalive and an X-API-Key."""
    return f"""fetch({json.dumps(url + "/event")}, {{method: "POST", keepalive: true,
        headers: {{"Content-Type": "application/json", "X-API-Key": {json.dumps(key)}}},
        body: {json.dumps(json.dumps(event))}}})
      .then(async r => ({{status: r.status, body: await r.json()}}),
            error => ({{error: error.name + ": " + error.message}}))"""


def test_keyed_fetch_keepalive_through_cors(browser, page_origins, collectors):
    _, keyed, database = collectors
    page = browser.open_page(page_origins[0].origin + "/blank.html")
    good, bad = make_event(), make_event()
    answer = page.evaluate(keyed_fetch(keyed.url, WRITE_KEY, good))
    assert answer == {"status": 202, "body": {"status": "accepted",
                                              "event_id": good["event_id"]}}
    # The page can read why it was refused: CORS headers are on errors too.
    answer = page.evaluate(keyed_fetch(keyed.url, "wk_wrong", bad))
    assert answer["status"] == 401 and answer["body"]["limit"] == "api_keys", answer
    wait_stored_once(database, [good["event_id"]])
    assert stored_counts(database, [bad["event_id"]]) == {}
    page.close()


def test_an_origin_not_allowed_is_refused_by_the_browser(browser, page_origins, collectors):
    open_collector, keyed, database = collectors
    page = browser.open_page(page_origins[1].origin + "/blank.html")
    event = make_event()
    preflights, sent = posts(keyed, "/event", "OPTIONS"), posts(keyed, "/event")
    answer = page.evaluate(keyed_fetch(keyed.url, WRITE_KEY, event))
    assert answer == {"error": "TypeError: Failed to fetch"}, answer
    # The browser asked (the preflight) and, not allowed, never sent the POST.
    assert posts(keyed, "/event", "OPTIONS") == preflights + 1
    assert posts(keyed, "/event") == sent
    assert stored_counts(database, [event["event_id"]]) == {}
    # CORS only hides answers: a beacon, which needs no preflight, is delivered and stored
    # from any origin. Only write keys (which a beacon cannot carry) keep other sites out.
    delivered = make_event()
    assert page.evaluate(beacon(open_collector.url + "/event", delivered)) is True
    wait_stored_once(database, [delivered["event_id"]])
    page.close()


def start_snippet(page, options: dict) -> None:
    """Create `window.firehose` on a page that loaded conf/browser/firehose.js."""
    page.evaluate(f"window.firehose = new Firehose({json.dumps(options)}); true")


def track(page, count: int) -> list[str]:
    """Track `count` events with the snippet; return their event_ids."""
    return page.evaluate(f"Array.from({{length: {count}}}, "
                         "(_, i) => firehose.track(1000 + i, {n: i, page: location.pathname}))")


def test_snippet_sends_its_batch_when_the_page_is_hidden(browser, page_origins, collectors):
    open_collector, _, database = collectors
    origin = page_origins[0].origin
    page = browser.open_page(origin + "/snippet.html")
    start_snippet(page, {"url": open_collector.url, "batchSize": 100, "flushInterval": 600000})
    beacons = posts(open_collector, "/events")
    event_ids = track(page, 5)
    assert page.evaluate("[firehose.pending(), firehose.sent]") == [5, 0]  # waiting to batch
    page.navigate(origin + "/blank.html")  # leaving the page hides it: one beacon goes
    wait_stored_once(database, event_ids)
    assert posts(open_collector, "/events") == beacons + 1
    page.close()


def test_snippet_sends_its_batch_when_another_tab_hides_it(browser, page_origins, collectors):
    open_collector, _, database = collectors
    origin = page_origins[0].origin
    page = browser.open_page(origin + "/snippet.html")
    start_snippet(page, {"url": open_collector.url, "batchSize": 100, "flushInterval": 600000})
    first = track(page, 3)
    other = browser.open_page(origin + "/blank.html")  # the new tab hides the first
    assert page.evaluate("[document.visibilityState, firehose.pending(), firehose.sent]") == [
        "hidden", 0, 3]
    wait_stored_once(database, first)
    browser.send("Target.activateTarget", {"targetId": page.target})  # back to the first tab
    assert page.evaluate("document.visibilityState") == "visible"
    later = track(page, 2)  # a page shown again batches as before
    assert page.evaluate("[firehose.pending(), firehose.sent]") == [2, 3]
    other.close()
    page.navigate(origin + "/blank.html")
    wait_stored_once(database, first + later)
    page.close()


def test_snippet_sends_full_batches_with_its_write_key(browser, page_origins, collectors):
    _, keyed, database = collectors
    page = browser.open_page(page_origins[0].origin + "/snippet.html")
    start_snippet(page, {"url": keyed.url, "writeKey": WRITE_KEY, "batchSize": 3,
                         "flushInterval": 600000})
    event_ids = track(page, 6)  # two full batches, sent at once
    wait_until(lambda: page.evaluate("firehose.sent") == 6, STORED_TIMEOUT, "6 events answered 202")
    wait_stored_once(database, event_ids)
    page.close()


def test_snippet_retries_a_lost_answer_with_the_same_event_ids(browser, page_origins,
                                                               collectors):
    _, keyed, database = collectors
    page = browser.open_page(page_origins[0].origin + "/snippet.html")
    start_snippet(page, {"url": keyed.url, "writeKey": WRITE_KEY, "batchSize": 4,
                         "flushInterval": 600000, "retryDelay": 100})
    accepted = value(scrape(keyed.url), "firehose_events_accepted_total")
    # Let the batch reach the collector, then cut the connection before the page reads
    # the answer, as a dropped network would: the page cannot know the events were stored.
    page.send("Fetch.enable", {"patterns": [{"urlPattern": "*/events",
                                             "requestStage": "Response"}]})
    try:
        event_ids = track(page, 4)
        paused = browser.wait_event("Fetch.requestPaused", page.session)
        assert paused["request"]["method"] == "POST" and paused["responseStatusCode"] == 202
        page.send("Fetch.failRequest", {"requestId": paused["requestId"],
                                        "errorReason": "ConnectionReset"})
        retried = browser.wait_event("Fetch.requestPaused", page.session)
        assert json.loads(retried["request"]["postData"]) == json.loads(
            paused["request"]["postData"])  # the same events, the same event_ids
        page.send("Fetch.continueRequest", {"requestId": retried["requestId"]})
    finally:
        page.send("Fetch.disable")
    wait_until(lambda: page.evaluate("firehose.sent") == 4, STORED_TIMEOUT,
               "the retried batch answered 202")
    wait_stored_once(database, event_ids)
    assert value(scrape(keyed.url), "firehose_events_accepted_total") == accepted + 8
    page.close()
