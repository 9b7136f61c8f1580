"""Write keys: a falcon middleware that lets only clients holding a key POST events.

Off when COLLECTOR_API_KEYS is empty. When on, the resources that take events
(`write_key_required = True`) need one of the keys, given in any of three ways:

    X-API-Key: KEY
    Authorization: Bearer KEY
    Authorization: Basic base64(KEY:)     the key as user name, as Segment's write keys

Everything else (/health, /ready, /metrics, /openapi.json, a CORS preflight) stays
open. A missing or wrong key is a 401 with the usual JSON error body.

Keys are compared as SHA-256 digests of their bytes, with `hmac.compare_digest`
against every configured key: the time taken tells nothing about how much of a key
was right, and a header that is not ASCII is just a wrong key, not a TypeError and
a 500 as comparing `str` would give (pitfall 10).
"""

import base64
import binascii
import hashlib
import hmac
from typing import Iterable

import falcon

from collector.errors import CollectorError

KEY_HEADER = "X-API-Key"
REALM = "firehose"
# Bearer, not Basic: a Basic challenge makes browsers prompt their user for a password.
CHALLENGE = f'Bearer realm="{REALM}"'
LIMIT = "api_keys"  # the setting whose keys the request lacks


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _header_bytes(value: str) -> bytes:
    """Return a header's bytes as sent: WSGI gives them decoded as latin-1 (PEP 3333)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # only a test client can pass such a str
        return value.encode("utf-8", "surrogatepass")


def presented_key(req: falcon.Request) -> bytes | None:
    """Return the key the request carries (X-API-Key, Bearer or Basic), or None."""
    header = req.get_header(KEY_HEADER)
    if header is not None:
        return _header_bytes(header.strip())
    authorization = req.get_header("Authorization")
    if authorization is None:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer":
        return _header_bytes(credentials)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(_header_bytes(credentials), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[0]
    return None


class WriteKeyAuth:
    """Falcon middleware: refuse event POSTs without one of the configured write keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key.encode("utf-8")) for key in keys]

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, params: dict) -> None:
        if req.method != "POST":
            return
        # Ask the object whose responder answers (a SharedRoute only borrows it).
        owner = getattr(getattr(resource, "on_post", None), "__self__", resource)
        if not getattr(owner, "write_key_required", False):
            return
        key = presented_key(req)
        if key is None:
            raise _unauthorized(f"a write key is required: send it in {KEY_HEADER}, "
                                "or as Authorization: Bearer KEY")
        if not self.accepts(key):
            raise _unauthorized("the write key is not valid")

    def accepts(self, key: bytes) -> bool:
        """Tell whether key is one of the configured keys, in time independent of its value."""
        given = _digest(key)
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(given, digest)
        return matched


def _unauthorized(description: str) -> CollectorError:
    return CollectorError(falcon.HTTP_401, "Unauthorized", description, limit=LIMIT,
                          headers={"WWW-Authenticate": CHALLENGE})
