"""Read a request body within its limits: framing, content type, size, gzip, a leading BOM.

A body arrives with a Content-Length or chunked (Transfer-Encoding: chunked, which many
clients send for a streamed body). Either way it is read as it arrives and refused (413)
as soon as it passes the limit. A body is taken only when it arrived whole: a
Content-Length body that ends early (the client went away) or a chunked body that is
malformed or lacks its last chunk is refused (400), so no event is ever taken from part
of a message. A body that stops arriving is refused (408): see BODY_READ_TIMEOUT.
"""

import zlib

import falcon
import gevent

from collector.errors import CollectorError

JSON_TYPES = ("application/json", "text/plain")  # text/plain: navigator.sendBeacon
BATCH_TYPES = JSON_TYPES + ("application/x-ndjson",)
GZIP_WINDOW = 16 + zlib.MAX_WBITS  # gzip header and trailer
# Bytes asked of the stream at a time. gunicorn copies what it has read ahead (up to
# 1 MiB) on every read of a Content-Length body, so small steps cost: a 5 MiB body took
# 19 ms of CPU in 16 KiB reads, 5 ms in 256 KiB reads. A chunked body has no such cost,
# and small steps keep its limit checks and its timeouts close together.
LENGTH_STEP = 256 * 1024
CHUNKED_STEP = 16 * 1024
# Each read may wait BODY_READ_TIMEOUT seconds (nginx's client_body_timeout in
# conf/nginx.conf), or as long as its bytes take at MIN_BODY_RATE when that is longer.
# gunicorn bounds only the wait for a request's head (its keepalive setting): without
# this, a client that stops mid-body would hold its connection forever.
BODY_READ_TIMEOUT = 10
MIN_BODY_RATE = 2048  # bytes per second
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark; RFC 8259 section 8.1 lets a parser ignore it


def media_type(req: falcon.Request) -> str:
    """Return the request's media type without parameters, lower case ('' when absent)."""
    return (req.content_type or "").split(";", 1)[0].strip().lower()


def read_body(req: falcon.Request, max_bytes: int, limit_name: str,
              allowed_types: tuple[str, ...]) -> bytes:
    """Return the whole body, decompressed, without a leading BOM.

    Refuse a wrong type or encoding (415), too many bytes (413), and a body that did
    not arrive whole (400).
    """
    kind = media_type(req)
    if kind and kind not in allowed_types:
        raise CollectorError(
            falcon.HTTP_415, "Unsupported media type",
            f"Content-Type {kind!r} is not accepted; send one of {', '.join(allowed_types)}",
            limit="content_type")
    encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("gzip", "identity"):
        raise CollectorError(falcon.HTTP_415, "Unsupported content encoding",
                             f"Content-Encoding {encoding!r} is not accepted; "
                             "send gzip or no encoding", limit="content_encoding")
    if req.content_length is not None:
        raw = _read_length(req, req.content_length, max_bytes, limit_name)
    elif _chunked(req):
        raw = _read_chunked(req, max_bytes, limit_name)
    else:
        raw = b""  # neither a length nor chunked: HTTP/1.1 says there is no body
    body = _gunzip(raw, max_bytes, limit_name) if encoding == "gzip" else raw
    return body[len(BOM):] if body.startswith(BOM) else body


def _chunked(req: falcon.Request) -> bool:
    """Tell whether the body is chunked; refuse (501) a transfer coding other than chunked.

    gunicorn has already refused a Transfer-Encoding that does not end with chunked. It
    lets `gzip, chunked` through, but removes only the chunks: the body would still be
    compressed, and the answer would be a puzzling "not valid JSON".
    """
    codings = [c.strip().lower() for c in (req.get_header("Transfer-Encoding") or "").split(",")]
    unknown = [c for c in codings if c not in ("", "chunked", "identity")]
    if unknown:
        raise CollectorError(falcon.HTTP_501, "Not implemented",
                             f"Transfer-Encoding {unknown[0]!r} is not supported; send "
                             "chunked alone (with Content-Encoding: gzip to compress)",
                             limit="transfer_encoding")
    return "chunked" in codings


def _read_length(req: falcon.Request, length: int, max_bytes: int, limit_name: str) -> bytes:
    """Read a body of `length` bytes, refusing it if it is too long or ends early."""
    if length > max_bytes:
        raise _too_large(max_bytes, limit_name)
    # The server's own stream, not falcon's bounded_stream: both stop at the length, but
    # only a short read of this one shows that the client went away before the end.
    parts, received = [], 0
    while received < length:
        piece = _read(req, min(LENGTH_STEP, length - received))
        if not piece:
            break
        parts.append(piece)
        received += len(piece)
    raw = b"".join(parts)
    if len(raw) < length:
        raise CollectorError(falcon.HTTP_400, "Incomplete body",
                             f"the connection ended after {len(raw)} of the "
                             f"{length} bytes of Content-Length; nothing was accepted")
    return raw


def _read_chunked(req: falcon.Request, max_bytes: int, limit_name: str) -> bytes:
    """Read a chunked body, refusing it (413) as soon as it passes max_bytes."""
    if not req.env.get("wsgi.input_terminated"):
        # Without it, a WSGI server's stream has no end that marks the body's end.
        raise CollectorError(falcon.HTTP_411, "Length required",
                             "this server cannot read a chunked body; send Content-Length")
    parts, received = [], 0
    while True:
        piece = _read(req, min(CHUNKED_STEP, max_bytes + 1 - received))
        if not piece:
            return b"".join(parts)  # the last chunk (and any trailers) arrived
        parts.append(piece)
        received += len(piece)
        if received > max_bytes:
            # The rest is never kept: gunicorn discards it, 1 KiB at a time and for at
            # most its keep-alive timeout, before it reads another request.
            raise _too_large(max_bytes, limit_name)


class BodyStalled(Exception):
    """A read of the body did not complete in the time it was given."""


def _read(req: falcon.Request, size: int) -> bytes:
    """Read up to `size` bytes of the body; a short result means the stream ended."""
    try:
        # An Exception, not gevent's Timeout (a BaseException): gunicorn's body reader
        # then marks the body failed and closes the connection after the answer.
        with gevent.Timeout(max(BODY_READ_TIMEOUT, size / MIN_BODY_RATE), BodyStalled()):
            return req.stream.read(size)
    except BodyStalled:
        raise CollectorError(falcon.HTTP_408, "Request timeout",
                             f"the body came too slowly (each read of it may take "
                             f"{BODY_READ_TIMEOUT} s, or as long as its bytes take at "
                             f"{MIN_BODY_RATE} bytes/s); nothing was accepted",
                             limit="body_timeout") from None
    except Exception:  # the server's own errors: gunicorn's NoMoreData, a reset socket
        # gunicorn raises when a chunked body is malformed or the connection ends inside
        # it, and then closes the connection after this answer. Its message may quote
        # the client's bytes, so it is not repeated here.
        raise CollectorError(falcon.HTTP_400, "Incomplete body",
                             "the body could not be read whole (malformed chunks, or the "
                             "connection ended inside it); nothing was accepted") from None


def _gunzip(raw: bytes, max_bytes: int, limit_name: str) -> bytes:
    """Decompress at most max_bytes + 1 bytes, so a small gzip bomb costs no memory."""
    inflater = zlib.decompressobj(GZIP_WINDOW)
    try:
        body = inflater.decompress(raw, max_bytes + 1)
    except zlib.error as ex:
        raise CollectorError(falcon.HTTP_400, "Invalid body",
                             f"body is not valid gzip: {ex}") from None
    if len(body) > max_bytes or inflater.unconsumed_tail:
        raise _too_large(max_bytes, limit_name, decompressed=True)
    if not inflater.eof:
        raise CollectorError(falcon.HTTP_400, "Invalid body", "gzip body is truncated")
    return body


def _too_large(max_bytes: int, limit_name: str, decompressed: bool = False) -> CollectorError:
    what = "decompressed body" if decompressed else "body"
    return CollectorError(falcon.HTTP_413, "Payload too large",
                          f"{what} exceeds {max_bytes} bytes", limit=limit_name)
