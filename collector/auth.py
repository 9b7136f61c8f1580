"""API keys: falcon middleware that lets only clients holding a key POST events or read them.

Two independent sets of keys, each off when its setting is empty:

- write keys (COLLECTOR_API_KEYS) guard the resources that take events
  (`write_key_required = True`: POST /event, POST /events). A write key ships in a web
  page or an app, so it is public by design: it identifies the sender, it hides nothing.
- read keys (COLLECTOR_READ_KEYS) guard the resources that return stored events
  (`read_key_required = True`: GET /events, GET /counts). They are secrets, held by a
  dashboard or a job, never by a device.

A write key never opens a read and a read key never opens a write. Either is given in
any of three ways:

    X-API-Key: KEY
    Authorization: Bearer KEY
    Authorization: Basic base64(KEY:)     the key as user name, as Segment's write keys

Everything else (/health, /ready, /metrics, /openapi.json, a CORS preflight) stays
open. A missing or wrong key is a 401 with the usual JSON error body, whose `limit`
names the setting whose keys the request lacks.

Keys are compared as SHA-256 digests of their bytes, with `hmac.compare_digest`
against every configured key: the time taken tells nothing about how much of a key
was right, and a header that is not ASCII is just a wrong key, not a TypeError and
a 500 as comparing `str` would give.
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


class KeyAuth:
    """Falcon middleware: refuse requests to marked resources without one of the configured keys.

    A subclass says which requests it guards: `METHOD` on resources whose responder's
    owner has `MARKER` set, and names its keys in answers (`NOUN`) and the setting
    that holds them (`LIMIT`).
    """

    METHOD: str
    MARKER: str
    NOUN: str
    LIMIT: str

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key.encode("utf-8")) for key in keys]

    def process_resource(self, req: falcon.Request, resp: falcon.Response,
                         resource: object, params: dict) -> None:
        if req.method != self.METHOD:
            return
        # Ask the object whose responder answers (a SharedRoute only borrows it).
        responder = getattr(resource, "on_" + self.METHOD.lower(), None)
        owner = getattr(responder, "__self__", resource)
        if not getattr(owner, self.MARKER, False):
            return
        key = presented_key(req)
        if key is None:
            raise _unauthorized(f"a {self.NOUN} is required: send it in {KEY_HEADER}, "
                                "or as Authorization: Bearer KEY", self.LIMIT)
        if not self.accepts(key):
            raise _unauthorized(f"the {self.NOUN} is not valid", self.LIMIT)

    def accepts(self, key: bytes) -> bool:
        """Tell whether key is one of the configured keys, in time independent of its value."""
        given = _digest(key)
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(given, digest)
        return matched


class WriteKeyAuth(KeyAuth):
    """Refuse event POSTs without one of the write keys (COLLECTOR_API_KEYS)."""

    METHOD = "POST"
    MARKER = "write_key_required"
    NOUN = "write key"
    LIMIT = "api_keys"


class ReadKeyAuth(KeyAuth):
    """Refuse reads of stored events without one of the read keys (COLLECTOR_READ_KEYS)."""

    METHOD = "GET"
    MARKER = "read_key_required"
    NOUN = "read key"
    LIMIT = "read_keys"


def _unauthorized(description: str, limit: str) -> CollectorError:
    return CollectorError(falcon.HTTP_401, "Unauthorized", description, limit=limit,
                          headers={"WWW-Authenticate": CHALLENGE})
