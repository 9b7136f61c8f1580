"""Bodies as clients send them, straight to gunicorn and through nginx (conf/nginx.conf).

Chunked in every shape (1-byte chunks, one chunk, trailers, gzip inside), Expect:
100-continue, pipelined requests, a leading byte order mark: all stored. A body that
does not arrive whole (the client goes away before its Content-Length, or before the
last chunk) stores nothing, and the worker goes on serving without a traceback. A
chunked body past the limit is answered 413 before the client has finished sending it.
"""

import gzip
import json
import re
import time

import falcon.testing
import pytest

from collector.app import create_app
from collector.settings import Settings
from tests.body_server import (JSON_TYPE, NDJSON_TYPE, event_body, nginx, none_stored,  # noqa: F401
                               port, post, post_chunked_head, server, stored)
from tests.client import make_event, post_json
from tests.polling import wait_until
from tests.rawhttp import ConnectionClosed, RawConnection, chunked, request_head

CONTINUE_WAIT = 1  # seconds curl waits for a 100 Continue before it sends the body anyway
BOM = b"\xef\xbb\xbf"
EVENT_LIMIT = 65_536  # COLLECTOR_MAX_EVENT_BYTES's default, and nginx's for /event
LOG_WAIT = 10


def access_lines(collector, status: int) -> int:
    """Count gunicorn's access-log lines for POSTs answered `status`."""
    return len(re.findall(rf'"POST /events? HTTP/1.1" {status} ', collector.output()))


# --- Chunked ----------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 100_000], ids=["1-byte chunks", "one chunk"])
def test_chunked_event_is_stored(server, port, chunk_size):
    event, body = event_body()
    with RawConnection(port) as conn:
        conn.send(post_chunked_head("/event") + chunked(body, chunk_size))
        answer = conn.read_final()
    assert answer.status == 202, answer
    assert answer.json() == {"status": "accepted", "event_id": event["event_id"]}
    stored(server[1], event)


def test_chunked_one_byte_writes_each_chunk_apart(server, port):
    """Each chunk in a write of its own: the reader really meets the chunk boundaries."""
    event, body = event_body()
    with RawConnection(port) as conn:
        conn.send(post_chunked_head("/event"))
        conn.send_pieces(chunked(body[:200], 1), 4)  # "1\r\nX\r\n" split mid-chunk
        conn.send(chunked(body[200:], 1))
        answer = conn.read_final()
    assert answer.status == 202, answer
    stored(server[1], event)


def test_chunked_with_trailers_and_extensions(server, port):
    event, body = event_body()
    framed = chunked(body, 50, trailers={"X-Checksum": "abc", "X-Other": "1"})
    framed = framed.replace(b"\r\n", b";ext=1\r\n", 1)  # a chunk extension on the first
    with RawConnection(port) as conn:
        conn.send(post_chunked_head("/event", {"Trailer": "X-Checksum, X-Other"}) + framed)
        answer = conn.read_final()
    assert answer.status == 202, answer
    stored(server[1], event)


def test_gzip_inside_chunked(server, port):
    event, body = event_body()
    with RawConnection(port) as conn:
        conn.send(post_chunked_head("/event", {"Content-Encoding": "gzip"})
                  + chunked(gzip.compress(body), 7))
        answer = conn.read_final()
    assert answer.status == 202, answer
    stored(server[1], event)


@pytest.mark.parametrize("form", ["ndjson", "array"])
def test_chunked_batch_is_stored(server, port, form):
    events = [make_event() for _ in range(50)]
    if form == "ndjson":
        body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        content_type = NDJSON_TYPE
    else:
        body, content_type = json.dumps(events).encode(), JSON_TYPE
    with RawConnection(port) as conn:
        conn.send(post_chunked_head("/events", content_type=content_type)
                  + chunked(body, 333))
        answer = conn.read_final()
    assert answer.status == 202, answer
    assert len(answer.json()["accepted"]) == 50
    stored(server[1], *events)


@pytest.mark.parametrize("path", ["/event", "/events"])
def test_chunked_body_past_the_limit_is_413_before_its_end(server, port, path):
    limit = EVENT_LIMIT if path == "/event" else 5 * 1024 * 1024
    name = "max_event_bytes" if path == "/event" else "max_batch_bytes"
    piece = b"x" * 16_384
    with RawConnection(port) as conn:
        conn.send(post_chunked_head(path))
        # Past the limit, without the last chunk: the answer must not wait for the end.
        for _ in range(limit // len(piece) + 1):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        answer = conn.read_final()
    assert answer.status == 413, answer
    body = answer.json()
    assert body["limit"] == name and body["title"] == "Payload too large", body
    assert answer.headers["content-type"].startswith("application/json")


# --- Expect: 100-continue, pipelining -----------------------------------------------------

@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_expect_100_continue_is_answered_at_once(server, port, framing):
    event, body = event_body()
    if framing == "length":
        whole = post("/event", body, {"Expect": "100-continue"})
        head, rest = whole[:-len(body)], body
    else:
        head, rest = post_chunked_head("/event", {"Expect": "100-continue"}), chunked(body, 64)
    with RawConnection(port) as conn:
        started = time.monotonic()
        conn.send(head)
        interim = conn.read_response()  # a client that waits for it gets it, well in time
        waited = time.monotonic() - started
        conn.send(rest)
        answer = conn.read_final()
    assert interim.status == 100, interim
    assert waited < CONTINUE_WAIT
    assert answer.status == 202, answer
    stored(server[1], event)


def test_pipelined_requests_are_answered_in_order(server, port):
    first, first_body = event_body()
    second, second_body = event_body()
    batch = [make_event() for _ in range(3)]
    batch_body = b"".join(json.dumps(e).encode() + b"\n" for e in batch)
    third, third_body = event_body()
    with RawConnection(port) as conn:
        conn.send(post("/event", first_body)
                  + post_chunked_head("/event") + chunked(second_body, 10)
                  + post("/events", batch_body, content_type=NDJSON_TYPE)
                  + request_head("GET", "/health", {})
                  + post("/event", third_body))
        answers = [conn.read_final() for _ in range(5)]
    assert [a.status for a in answers] == [202, 202, 202, 200, 202], answers
    assert answers[0].json()["event_id"] == first["event_id"]
    assert answers[1].json()["event_id"] == second["event_id"]
    assert [a["event_id"] for a in answers[2].json()["accepted"]] == [
        e["event_id"] for e in batch]
    assert answers[4].json()["event_id"] == third["event_id"]
    stored(server[1], first, second, third, *batch)


# --- Bodies that do not arrive whole ---------------------------------------------------------

def test_body_shorter_than_content_length_is_refused(server):
    """The client half-closes after a complete event: it still reads the refusal."""
    collector, _ = server
    event, body = event_body()
    with RawConnection(collector.port) as conn:
        conn.send(post("/event", body).replace(
            b"Content-Length: %d" % len(body), b"Content-Length: 5000"))
        conn.shut_write()
        answer = conn.read_final()
        assert conn.closed_by_server()
    assert answer.status == 400, answer
    assert answer.json()["title"] == "Incomplete body"
    assert f"after {len(body)} of the 5000 bytes" in answer.json()["description"]
    none_stored(server, event)


# (case id, path, content type, what is sent before the client goes away)
def _cut_cases() -> list[tuple[str, str, str, bytes, list[dict]]]:
    one, one_body = event_body()
    lines = [make_event() for _ in range(3)]
    ndjson = b"".join(json.dumps(e).encode() + b"\n" for e in lines)
    two, two_body = event_body()
    three, three_body = event_body()
    array = [make_event() for _ in range(2)]
    four, four_body = event_body()
    return [
        ("length, a whole event", "/event",
         post("/event", one_body).replace(b"Content-Length: %d" % len(one_body),
                                          b"Content-Length: 5000"), [one]),
        ("length, whole NDJSON lines", "/events",
         post("/events", ndjson, content_type=NDJSON_TYPE).replace(
             b"Content-Length: %d" % len(ndjson), b"Content-Length: 50000"), lines),
        ("chunked, no last chunk", "/event",
         post_chunked_head("/event") + chunked(two_body, 10)[:-5], [two]),
        ("chunked, inside a chunk", "/event",
         post_chunked_head("/event") + b"%x\r\n" % (len(three_body) + 10) + three_body, [three]),
        ("chunked, last chunk but no end of trailers", "/events",
         post_chunked_head("/events") + chunked(json.dumps(array).encode(), 100)[:-2], array),
        ("chunked, no CRLF after a chunk", "/event",
         post_chunked_head("/event") + b"%x\r\n" % len(four_body) + four_body, [four]),
    ]


CUT_CASES = _cut_cases()


@pytest.mark.parametrize("name,path,sent,events", CUT_CASES, ids=[c[0] for c in CUT_CASES])
@pytest.mark.parametrize("ending", ["close", "half-close"])
def test_client_gone_mid_body_stores_nothing(server, name, path, sent, events, ending):
    collector, _ = server
    refused_before = access_lines(collector, 400)
    with RawConnection(collector.port) as conn:
        conn.send(sent)
        if ending == "half-close":
            conn.shut_write()
            answer = conn.read_final()
            assert answer.status == 400, answer
            assert answer.json()["title"] == "Incomplete body", answer
    wait_until(lambda: access_lines(collector, 400) > refused_before, LOG_WAIT,
               "gunicorn to log the refusal")
    none_stored(server, *events)
    assert collector.health()["status"]  # the same single worker answers on
    output = collector.output()
    assert "Traceback" not in output and '" 500 ' not in output


def test_client_gone_mid_body_through_nginx_reaches_no_worker(server, nginx):
    """nginx reads the whole body first: a client that leaves early never gets past it."""
    collector, _ = server
    event, body = event_body()
    before = collector.output().count('"POST /event HTTP/1.1"')
    with RawConnection(nginx.port) as conn:
        conn.send(post("/event", body).replace(b"Content-Length: %d" % len(body),
                                               b"Content-Length: 5000"))
        conn.shut_write()
        with pytest.raises(ConnectionClosed):
            conn.read_final()
    wait_until(lambda: "prematurely closed connection" in nginx.error_log(), LOG_WAIT,
               "nginx to log the client's early close")
    none_stored(server, event)
    assert collector.output().count('"POST /event HTTP/1.1"') == before + 1  # the marker


# --- A leading byte order mark -----------------------------------------------------------------

@pytest.mark.parametrize("shape", ["event", "event gzip", "ndjson", "array", "chunked"])
def test_leading_bom_is_ignored(server, port, shape):
    events = [make_event() for _ in range(2 if shape in ("ndjson", "array") else 1)]
    headers, content_type, path = {}, JSON_TYPE, "/event"
    if shape in ("event", "event gzip", "chunked"):
        body = BOM + json.dumps(events[0]).encode()
    elif shape == "ndjson":
        body = BOM + b"".join(json.dumps(e).encode() + b"\n" for e in events)
        content_type, path = NDJSON_TYPE, "/events"
    else:
        body, path = BOM + json.dumps(events).encode(), "/events"
    if shape == "event gzip":
        body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
    with RawConnection(port) as conn:
        if shape == "chunked":
            conn.send(post_chunked_head(path) + chunked(body, 2))  # the BOM split in two
        else:
            conn.send(post(path, body, headers, content_type))
        answer = conn.read_final()
    assert answer.status == 202, answer
    stored(server[1], *events)


def test_only_one_bom_is_ignored(server):
    collector, _ = server
    event, body = event_body()
    answer = post_json(collector.url + "/event", BOM + BOM + body)
    assert answer.status == 400, answer
    assert answer.body["title"] == "Invalid body"
    none_stored(server, event)


def test_chunked_body_without_a_terminated_stream_is_411(tmp_path):
    """A WSGI server that does not mark the end of wsgi.input cannot frame a chunked body."""
    app = create_app(Settings(database_url="postgresql://unused/none", spool_dir=str(tmp_path)))
    answer = falcon.testing.TestClient(app).simulate_post(
        "/event", headers={"Content-Type": JSON_TYPE, "Transfer-Encoding": "chunked"})
    assert answer.status_code == 411, answer.text
    assert answer.json["title"] == "Length required"


def test_expect_100_continue_past_the_limit(server, nginx):
    """nginx refuses a declared length past the limit at once; gunicorn asks for the body.

    gunicorn answers 100 Continue before the app sees the request, so the client sends
    the body and only then gets the 413; nginx answers 413 instead of 100 Continue.
    """
    collector, _ = server
    head = request_head("POST", "/event", {"Content-Type": JSON_TYPE, "Expect": "100-continue",
                                           "Content-Length": str(EVENT_LIMIT + 1)})
    with RawConnection(nginx.port) as conn:
        conn.send(head)
        refused = conn.read_response()
    assert refused.status == 413 and refused.json()["limit"] == "max_event_bytes", refused
    with RawConnection(collector.port) as conn:
        conn.send(head)
        interim = conn.read_response()
        conn.send(b" " * (EVENT_LIMIT + 1))
        answer = conn.read_final()
    assert interim.status == 100, interim
    assert answer.status == 413 and answer.json()["limit"] == "max_event_bytes", answer
