"""Read a request body within its limits: content type, size, and gzip decompression."""

import zlib

import falcon

from collector.errors import CollectorError

JSON_TYPES = ("application/json", "text/plain")  # text/plain: navigator.sendBeacon
BATCH_TYPES = JSON_TYPES + ("application/x-ndjson",)
GZIP_WINDOW = 16 + zlib.MAX_WBITS  # gzip header and trailer


def media_type(req: falcon.Request) -> str:
    """Return the request's media type without parameters, lower case ('' when absent)."""
    return (req.content_type or "").split(";", 1)[0].strip().lower()


def read_body(req: falcon.Request, max_bytes: int, limit_name: str,
              allowed_types: tuple[str, ...]) -> bytes:
    """Return the body, decompressed; refuse a wrong type (415) or too many bytes (413)."""
    kind = media_type(req)
    if kind and kind not in allowed_types:
        raise CollectorError(
            falcon.HTTP_415, "Unsupported media type",
            f"Content-Type {kind!r} is not accepted; send one of {', '.join(allowed_types)}",
            limit="content_type")
    if req.content_length is not None and req.content_length > max_bytes:
        raise _too_large(max_bytes, limit_name)
    raw = req.bounded_stream.read(max_bytes + 1)
    encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
    if encoding == "gzip":
        return _gunzip(raw, max_bytes, limit_name)
    if encoding != "identity":
        raise CollectorError(falcon.HTTP_415, "Unsupported content encoding",
                             f"Content-Encoding {encoding!r} is not accepted; "
                             "send gzip or no encoding", limit="content_encoding")
    if len(raw) > max_bytes:
        raise _too_large(max_bytes, limit_name)
    return raw


def _gunzip(raw: bytes, max_bytes: int, limit_name: str) -> bytes:
    """Decompress at most max_bytes + 1 bytes, so a zip bomb costs no memory."""
    if len(raw) > max_bytes:
        raise _too_large(max_bytes, limit_name)
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
