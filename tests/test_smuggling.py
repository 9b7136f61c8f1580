"""Request-smuggling shapes are refused, and never store two events from one message.

Each message below carries one event in its body and a second whole request after it,
framed so that a server that reads the framing one way sees one request, and a server
(or proxy) that reads it another way sees two. gunicorn 27's parser refuses each with
a 4xx (501 for a transfer coding it does not know) and closes the connection; through
nginx (conf/nginx.conf) each is refused by nginx, in the app's JSON shape. Either way,
neither event is stored and no second answer comes.
"""

import gzip

import pytest

from tests.body_server import (event_body, nginx, none_stored, port, post,  # noqa: F401
                               server)
from tests.rawhttp import RawConnection, chunked, request_head

JSON_HEAD = ("Content-Type", "application/json")


def _cases() -> list[tuple[str, list, bytes, list[dict], dict[str, int]]]:
    """(id, headers, body, events in it, status by front)."""
    cases = []

    def add(name, headers, body, events, gunicorn, nginx_status):
        cases.append((name, headers, body, events,
                      {"gunicorn": gunicorn, "nginx": nginx_status}))

    first, first_body = event_body()
    second, second_body = event_body()
    inner = post("/event", second_body)  # the smuggled request
    framed = chunked(first_body, 64)
    # Content-Length covers the chunked framing only: the second request follows it.
    add("Content-Length and Transfer-Encoding",
        [JSON_HEAD, ("Content-Length", str(len(framed))), ("Transfer-Encoding", "chunked")],
        framed + inner, [first, second], 400, 400)
    third, third_body = event_body()
    fourth, fourth_body = event_body()
    framed = chunked(third_body, 64)
    add("Transfer-Encoding, then Content-Length",
        [JSON_HEAD, ("Transfer-Encoding", "chunked"), ("Content-Length", str(len(framed)))],
        framed + post("/event", fourth_body), [third, fourth], 400, 400)
    fifth, fifth_body = event_body()
    sixth, sixth_body = event_body()
    inner = post("/event", sixth_body)
    add("two different Content-Lengths",
        [JSON_HEAD, ("Content-Length", str(len(fifth_body))),
         ("Content-Length", str(len(fifth_body) + len(inner)))],
        fifth_body + inner, [fifth, sixth], 400, 400)
    seventh, seventh_body = event_body()
    add("two equal Content-Lengths",
        [JSON_HEAD, ("Content-Length", str(len(seventh_body))),
         ("Content-Length", str(len(seventh_body)))],
        seventh_body, [seventh], 400, 400)
    eighth, eighth_body = event_body()
    ninth, ninth_body = event_body()
    add("Transfer-Encoding: chunked, identity",
        [JSON_HEAD, ("Transfer-Encoding", "chunked, identity")],
        chunked(eighth_body, 64) + post("/event", ninth_body), [eighth, ninth], 400, 501)
    tenth, tenth_body = event_body()
    eleventh, eleventh_body = event_body()
    add("Transfer-Encoding twice",
        [JSON_HEAD, ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
        chunked(tenth_body, 64) + post("/event", eleventh_body), [tenth, eleventh], 400, 400)
    twelfth, twelfth_body = event_body()
    thirteenth, thirteenth_body = event_body()
    framed = chunked(twelfth_body, 64)
    # obs-fold: "chunked" on a continuation line of Transfer-Encoding (RFC 9112 5.2).
    add("obs-fold Transfer-Encoding",
        [JSON_HEAD, ("Content-Length", str(len(framed))), ("Transfer-Encoding", "\r\n chunked")],
        framed + post("/event", thirteenth_body), [twelfth, thirteenth], 400, 400)
    fourteenth, fourteenth_body = event_body()
    add("obs-fold in another header",
        [JSON_HEAD, ("X-Note", "one\r\n two"), ("Content-Length", str(len(fourteenth_body)))],
        fourteenth_body, [fourteenth], 400, 400)
    fifteenth, fifteenth_body = event_body()
    sixteenth, sixteenth_body = event_body()
    framed = chunked(fifteenth_body, 64)
    add("space before the colon",
        [JSON_HEAD, ("Content-Length", str(len(framed))), ("Transfer-Encoding ", "chunked")],
        framed + post("/event", sixteenth_body), [fifteenth, sixteenth], 400, 400)
    seventeenth, seventeenth_body = event_body()
    add("Content-Length with a sign",
        [JSON_HEAD, ("Content-Length", f"+{len(seventeenth_body)}")],
        seventeenth_body, [seventeenth], 400, 400)
    eighteenth, eighteenth_body = event_body()
    nineteenth, nineteenth_body = event_body()
    add("an unknown transfer coding",
        [JSON_HEAD, ("Transfer-Encoding", "xchunked")],
        chunked(eighteenth_body, 64) + post("/event", nineteenth_body),
        [eighteenth, nineteenth], 501, 501)
    return cases


CASES = _cases()


@pytest.mark.parametrize("name,headers,body,events,statuses", CASES,
                         ids=[c[0] for c in CASES])
def test_smuggling_shape_is_refused(server, port, request, name, headers, body, events,
                                    statuses):
    front = request.node.callspec.params["port"]
    with RawConnection(port) as conn:
        conn.send(request_head("POST", "/event", headers) + body)
        answer = conn.read_final()
        assert conn.closed_by_server(), "the connection stayed open after the refusal"
        rest = conn.unread
    assert answer.status == statuses[front], answer
    assert rest == b"", f"a second answer came: {rest[:200]!r}"
    if front == "nginx":  # every refusal of conf/nginx.conf is the app's JSON
        assert answer.headers["content-type"].startswith("application/json"), answer
        assert {"title", "description"} <= answer.json().keys()
    none_stored(server, *events)


def test_chunked_http_1_0_is_refused(server):
    """HTTP/1.0 has no chunked coding: gunicorn refuses it rather than guess the framing."""
    collector, _ = server
    event, body = event_body()
    with RawConnection(collector.port) as conn:
        conn.send(request_head("POST", "/event", [JSON_HEAD, ("Transfer-Encoding", "chunked")],
                               version="HTTP/1.0") + chunked(body, 64))
        answer = conn.read_final()
    assert answer.status == 400, answer
    none_stored(server, event)


def test_bad_chunk_size_is_refused_and_closes(server):
    """A chunk size gunicorn cannot read fails in the body reader: the app's 400, then close."""
    collector, _ = server
    event, body = event_body()
    second, second_body = event_body()
    framed = b"0x%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with RawConnection(collector.port) as conn:
        conn.send(request_head("POST", "/event", [JSON_HEAD, ("Transfer-Encoding", "chunked")])
                  + framed + post("/event", second_body))
        answer = conn.read_final()
        assert conn.closed_by_server()
        assert conn.unread == b""
    assert answer.status == 400, answer
    assert answer.json()["title"] == "Incomplete body"
    none_stored(server, event, second)


def test_nginx_501_page_is_internal(nginx):
    with RawConnection(nginx.port) as conn:
        conn.send(request_head("GET", "/.firehose-errors/not-implemented", {}))
        answer = conn.read_final()
    assert answer.status == 404, answer
    assert answer.headers["content-type"].startswith("application/json")


def test_a_compressing_transfer_coding_is_501_json(server):
    """gunicorn takes `gzip, chunked` and removes only the chunks: the app refuses the rest."""
    collector, _ = server
    event, body = event_body()
    with RawConnection(collector.port) as conn:
        conn.send(request_head("POST", "/event",
                               [JSON_HEAD, ("Transfer-Encoding", "gzip, chunked")])
                  + chunked(gzip.compress(body), 64))
        answer = conn.read_final()
    assert answer.status == 501, answer
    assert answer.json()["limit"] == "transfer_encoding"
    none_stored(server, event)


@pytest.mark.parametrize("refusal", ["415 before reading", "413 before reading", "400 invalid"])
def test_a_body_refused_unread_is_skipped_whole(server, port, request, refusal):
    """The app may refuse without reading the body: the next request starts after it.

    Each body holds a whole request of its own; read as a request, it would store an event.
    (nginx closes the connection after its own 413, so there the next request is not read.)
    """
    closes = request.node.callspec.params["port"] == "nginx" and refusal.startswith("413")
    smuggled, smuggled_body = event_body()
    inner = post("/event", smuggled_body)
    headers, body, status = {}, inner, 400
    if refusal.startswith("415"):
        headers, status = {"Content-Type": "application/xml"}, 415
    elif refusal.startswith("413"):
        body, status = inner + b" " * 70_000, 413
    after, after_body = event_body()
    with RawConnection(port) as conn:
        conn.send(post("/event", body, headers) + post("/event", after_body))
        first = conn.read_final()
        if closes:
            assert conn.closed_by_server() and conn.unread == b""
        else:
            second = conn.read_final()
            assert second.status == 202, second
            assert second.json()["event_id"] == after["event_id"], second
    assert first.status == status, first
    none_stored(server, smuggled)
