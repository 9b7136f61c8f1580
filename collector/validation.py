"""Turn request bytes into an `Event`, or raise `EventRejected` naming the field at fault.

One strict pass with msgspec decodes the envelope and checks the types; `metadata` is
kept as the client's own JSON text (msgspec.Raw), so it is stored exactly as sent and
never decoded and re-encoded on the hot path. The checks that follow are the ones
PostgreSQL's jsonb would otherwise fail on later, in the flusher, again at every retry: a
`\\u0000` escape, lone surrogates, numbers past a double's range, deep nesting.
"""

import datetime
import re
import time
import uuid
from typing import Annotated, NamedTuple, Optional

import msgspec

MAX_USER_ID = 9_223_372_036_854_775_807  # PostgreSQL bigint
ENVELOPE_FIELDS = ("user_id", "timestamp", "metadata", "event_id")

# An escaped NUL (`\u0000`) preceded by an even number of backslashes, so that the
# text `\\u0000` (a backslash, then "u0000") is not mistaken for one.
NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
MSGSPEC_PATH = re.compile(r"at `\$\.?([^`\[]*)")
MSGSPEC_FIELD = re.compile(r"field `([^`]*)`")


class Event(NamedTuple):
    """One accepted event, as it travels through the queue, the spool and the writer."""

    event_id: str
    user_id: int
    timestamp: str  # ISO 8601 with an explicit offset
    metadata: str  # the client's JSON object text
    received_at: float  # seconds since the epoch


class EventRejected(Exception):
    """The input breaks the event contract; `field` or `limit` names what is at fault."""

    def __init__(self, description: str, field: str | None = None,
                 limit: str | None = None, too_large: bool = False) -> None:
        super().__init__(description)
        self.description = description
        self.field = field
        self.limit = limit
        self.too_large = too_large


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    user_id: Annotated[int, msgspec.Meta(ge=0, le=MAX_USER_ID)]
    timestamp: datetime.datetime
    metadata: msgspec.Raw
    event_id: Optional[uuid.UUID] = None


class EventValidator:
    """Checks event documents against the contract and the configured limits."""

    def __init__(self, max_metadata_depth: int) -> None:
        self.max_metadata_depth = max_metadata_depth
        self._decoder = msgspec.json.Decoder(_Envelope)
        self._raw_list = msgspec.json.Decoder(list[msgspec.Raw])

    def parse_event(self, body: bytes) -> Event:
        """Validate one JSON event document and return it as an Event."""
        _check_utf8(body)
        try:
            envelope = self._decoder.decode(body)
        except RecursionError:
            raise EventRejected(
                f"metadata nests deeper than {self.max_metadata_depth} levels",
                field="metadata", limit="max_metadata_depth") from None
        except msgspec.ValidationError as ex:
            raise _from_validation_error(ex) from None
        except msgspec.DecodeError as ex:
            raise EventRejected(f"body is not valid JSON: {ex}") from None
        return self._finish(envelope)

    def parse_documents(self, body: bytes, ndjson: bool) -> list[bytes]:
        """Split a batch body (a JSON array, or one document a line) into documents."""
        _check_utf8(body)
        if ndjson:
            return [line for line in body.split(b"\n") if line.strip()]
        try:
            return [bytes(raw) for raw in self._raw_list.decode(body)]
        except RecursionError:
            raise EventRejected(
                f"metadata nests deeper than {self.max_metadata_depth} levels",
                field="metadata", limit="max_metadata_depth") from None
        except msgspec.ValidationError:
            raise EventRejected("body must be a JSON array of event objects") from None
        except msgspec.DecodeError as ex:
            raise EventRejected(f"body is not valid JSON: {ex}") from None

    def _finish(self, envelope: _Envelope) -> Event:
        metadata = bytes(envelope.metadata)
        self._check_metadata(metadata)
        stamp = envelope.timestamp
        if stamp.tzinfo is None:
            # The contract reads a date-time without an offset as UTC.
            stamp = stamp.replace(tzinfo=datetime.timezone.utc)
        elif stamp.utcoffset():
            # RFC 3339 allows offsets up to ±23:59, PostgreSQL only to ±15:59 (found by
            # tests/test_openapi.py); timestamptz keeps the instant alone, so send it in UTC.
            try:
                stamp = stamp.astimezone(datetime.timezone.utc)
            except OverflowError:
                raise EventRejected("timestamp is out of range once converted to UTC",
                                    field="timestamp") from None
        event_id = envelope.event_id or uuid.uuid4()
        return Event(str(event_id), envelope.user_id, stamp.isoformat(),
                     metadata.decode("utf-8"), time.time())

    def _check_metadata(self, metadata: bytes) -> None:
        """Refuse metadata that is not an object or that jsonb cannot hold."""
        if metadata[:1] != b"{":
            raise EventRejected("metadata must be a JSON object", field="metadata")
        if b"\\u0000" in metadata and NUL_ESCAPE.search(metadata):
            raise EventRejected("metadata contains \\u0000, which PostgreSQL cannot store",
                                field="metadata")
        # Counting brackets is a cheap upper bound on depth; only past it do we decode.
        brackets = metadata.count(b"{") + metadata.count(b"[")
        needs_decode = brackets > self.max_metadata_depth or _may_overflow(metadata)
        if not needs_decode:
            return
        try:
            value = msgspec.json.decode(metadata)
        except RecursionError:
            value = None
            depth = self.max_metadata_depth + 1
        except msgspec.ValidationError as ex:
            # msgspec refuses numbers a double cannot hold: jsonb readers would get
            # Infinity, and PostgreSQL's numeric has limits of its own.
            raise EventRejected(f"metadata number out of range ({ex})",
                                field="metadata", limit="number") from None
        else:
            depth = _depth(value)
        if depth > self.max_metadata_depth:
            raise EventRejected(
                f"metadata nests deeper than {self.max_metadata_depth} levels",
                field="metadata", limit="max_metadata_depth")


# Numbers a double may not hold: an exponent of 3 digits or more, or 19 digits in a
# row (the regex [eE][+-]?[0-9]{3}|[0-9]{19}). Found in the metadata with every digit
# read as 0 and E as e: bytes.translate and four substring searches take a sixth of
# that regex's time, which was a third of a worker's CPU on batches (py-spy).
DIGITS_AS_ZERO = bytes.maketrans(b"123456789E", b"000000000e")
LONG_NUMBER = b"0" * 19


def _may_overflow(metadata: bytes) -> bool:
    """Tell whether metadata may hold a number too large to check without decoding it."""
    masked = metadata.translate(DIGITS_AS_ZERO)
    return (b"e000" in masked or b"e+000" in masked or b"e-000" in masked
            or LONG_NUMBER in masked)


def _depth(value: object) -> int:
    """Return the nesting depth of decoded JSON, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in node)
    return deepest


def _check_utf8(body: bytes) -> None:
    """Refuse bodies that are not UTF-8 (msgspec.Raw passes bytes through unchecked)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as ex:
        raise EventRejected(f"body is not valid UTF-8 (byte {ex.start})") from None


def _from_validation_error(ex: msgspec.ValidationError) -> EventRejected:
    """Translate msgspec's message into an EventRejected naming the field."""
    message = str(ex)
    path = MSGSPEC_PATH.search(message)
    if path and path.group(1):
        field = path.group(1)
        rule = message.split(" - at ")[0]
        return EventRejected(f"{field} {_describe(field, rule)}", field=field)
    named = MSGSPEC_FIELD.search(message)
    if named and "unknown field" in message:
        return EventRejected(
            f"unknown field {named.group(1)!r}; allowed: {', '.join(ENVELOPE_FIELDS)}",
            field=named.group(1))
    if named and "missing required field" in message:
        return EventRejected(f"{named.group(1)} is required", field=named.group(1))
    return EventRejected(f"body must be a JSON object with {', '.join(ENVELOPE_FIELDS)}")


FIELD_RULES = {
    "user_id": f"must be an integer from 0 to {MAX_USER_ID}",
    "timestamp": "must be an RFC 3339 date-time string, e.g. 2024-05-01T12:00:00Z",
    "metadata": "must be a JSON object",
    "event_id": "must be a UUID string",
}


def _describe(field: str, rule: str) -> str:
    """Phrase a msgspec rule for a client, in the contract's words."""
    return f"{FIELD_RULES[field]} ({rule})" if field in FIELD_RULES else rule
