"""Shared by the body tests: a collector for one module, nginx in front, what was stored.

The fixtures are imported by the test modules that use them; each module gets its own
single-worker collector (access log on) and its own nginx.
"""

import json

import pytest

from tests.client import make_event, post_json
from tests.fixtures.collector import start_module_collector
from tests.fixtures.nginx import Nginx, nginx_binary
from tests.polling import wait_until
from tests.rawhttp import request_head

STORE_TIMEOUT = 20  # seconds for accepted events to reach PostgreSQL
FRONTS = ["gunicorn", "nginx"]
JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One single-worker collector (access log on) for the module, and its database."""
    collector, database = start_module_collector(postgres, tmp_path_factory, {"ACCESS_LOG": "1"})
    yield collector, database
    collector.terminate()


@pytest.fixture(scope="module")
def nginx(server, tmp_path_factory):
    """Real nginx running conf/nginx.conf in front of the module's collector."""
    proxy = Nginx(nginx_binary(), tmp_path_factory.mktemp("nginx"), (server[0].port,)).start()
    yield proxy
    proxy.stop()


@pytest.fixture(params=FRONTS)
def port(request, server):
    """The port a client talks to: gunicorn's own, or nginx's in front of it."""
    if request.param == "nginx":
        return request.getfixturevalue("nginx").port
    return server[0].port


def event_body(**extra) -> tuple[dict, bytes]:
    """Return a valid event and its JSON bytes."""
    event = make_event(**extra)
    return event, json.dumps(event).encode()


def post(path: str, body: bytes, headers: dict | None = None,
         content_type: str = JSON_TYPE) -> bytes:
    """Return a whole POST with a Content-Length."""
    return request_head("POST", path, {"Content-Type": content_type,
                                       "Content-Length": str(len(body)),
                                       **(headers or {})}) + body


def post_chunked_head(path: str, headers: dict | None = None,
                      content_type: str = JSON_TYPE) -> bytes:
    """Return the head of a chunked POST (the chunks follow)."""
    return request_head("POST", path, {"Content-Type": content_type,
                                       "Transfer-Encoding": "chunked", **(headers or {})})


def stored(database, *events: dict) -> None:
    """Wait until every given event has its row."""
    ids = {e["event_id"] for e in events}
    wait_until(lambda: ids <= set(database.event_ids()), STORE_TIMEOUT,
               f"{len(ids)} event(s) in PostgreSQL")


def none_stored(server, *events: dict) -> None:
    """Show that none of the events has a row, once a later event (a marker) has one.

    The module's collector has one worker, whose queue and flusher keep their order: once
    an event sent after these has been stored, anything accepted before it would be too.
    """
    collector, database = server
    marker = make_event()
    assert post_json(collector.url + "/event", marker).status == 202
    stored(database, marker)
    ids = {e["event_id"] for e in events}
    assert not ids & set(database.event_ids()), "an event that was refused was stored"
