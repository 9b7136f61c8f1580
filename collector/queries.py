"""GET /events and GET /counts: parameters checked, events and counts read back as JSON.

Every parameter is checked before any query runs: a bad one is a 400 naming it
(`"field": "<parameter>"`), an unknown or repeated one too, so that a typo such as
`userId` is caught at once. The reads themselves run on the worker's read
connections (storage/readpool.py), never on the flusher's.

`from` and `to` are RFC 3339 date-times (one without an offset is UTC); `from` is
inclusive, `to` exclusive. In a URL a `+` offset must be sent as `%2B`; a `+` that
arrives decoded as a space before the offset is read as `+`.
"""

import base64
import binascii
import datetime
import re
import uuid

import falcon
import msgspec

from collector.errors import CollectorError
from collector.validation import MAX_USER_ID
from storage.readpool import BUSY, REFUSED, TIMEOUT, ReadFailed
from storage.reader import EventFilter, EventReader, Key
from storage.rollups import UNITS, CountFilter, CountReader

DEFAULT_LIMIT = 100  # events per page
MAX_LIMIT = 1000  # a larger `limit` is lowered to this
MAX_FILTER_BYTES = 2048  # of the `metadata` parameter (gunicorn refuses request lines past 4094)
DEFAULT_UNIT = "hour"
UNIT_LENGTH = {"minute": datetime.timedelta(minutes=1), "hour": datetime.timedelta(hours=1),
               "day": datetime.timedelta(days=1)}
DEFAULT_SPAN = {"minute": datetime.timedelta(hours=1), "hour": datetime.timedelta(days=1),
                "day": datetime.timedelta(days=30)}  # of /counts without `from`
MAX_BUCKETS = 10_080  # a week of minutes, 14 months of hours, 27 years of days
MAX_COUNT_ROWS = 10_000  # of a count by key; more are cut and `truncated` is true
BUSY_RETRY_AFTER = 1  # seconds
UNAVAILABLE_RETRY_AFTER = 5  # seconds

EVENT_PARAMETERS = ("user_id", "from", "to", "metadata", "limit", "cursor")
COUNT_PARAMETERS = ("bucket", "from", "to", "user_id", "key")
DIGITS = re.compile(r"[0-9]{1,19}")
DECODED_PLUS = re.compile(r" ([0-9]{2}:[0-9]{2})$")  # "...12:00:00 05:30" was "+05:30"
MOMENT_RULE = "must be an RFC 3339 date-time, e.g. 2024-05-01T12:00:00Z"
UTC = datetime.timezone.utc

encode = msgspec.json.Encoder().encode
decode_cursor = msgspec.json.Decoder(tuple[datetime.datetime, uuid.UUID]).decode


class EventQueryResource:
    """GET /events: stored events, newest first, filtered, one page at a time."""

    read_key_required = True  # collector/auth.py

    def __init__(self, reader: EventReader) -> None:
        self._reader = reader

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        params = _parameters(req, EVENT_PARAMETERS)
        limit = min(_positive(params, "limit", DEFAULT_LIMIT), MAX_LIMIT)
        wanted = EventFilter(
            user_id=_user_id(params),
            since=_moment(params, "from"),
            until=_moment(params, "to"),
            metadata=_metadata(params),
            after=_cursor(params),
        )
        if wanted.since and wanted.until and wanted.since >= wanted.until:
            raise _invalid("to", "to must be later than from")
        page = _read(lambda: self._reader.page(wanted, limit))
        resp.content_type = falcon.MEDIA_JSON
        resp.data = encode({
            "events": [msgspec.Raw(event.encode()) for event in page.events],
            "next": encode_cursor(page.next_key) if page.next_key else None,
            "limit": limit,
        })


class CountResource:
    """GET /counts: event counts per minute, hour or day, in total, for a user or per value."""

    read_key_required = True  # collector/auth.py

    def __init__(self, reader: CountReader, rollup_keys: tuple[str, ...]) -> None:
        self._reader = reader
        self._rollup_keys = rollup_keys

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        params = _parameters(req, COUNT_PARAMETERS)
        unit = params.get("bucket", DEFAULT_UNIT)
        if unit not in UNITS:
            raise _invalid("bucket", f"bucket must be one of {', '.join(UNITS)}")
        since, until = _bucket_range(params, unit)
        user_id, key = _user_id(params), params.get("key")
        if key is not None and key not in self._rollup_keys:
            counted = ", ".join(self._rollup_keys) or "none (set COLLECTOR_ROLLUP_KEYS)"
            raise _invalid("key", f"metadata key {key!r} is not counted; counted keys: {counted}")
        if key is not None and user_id is not None:
            raise _invalid("key", "key and user_id cannot be combined: no count is kept "
                           "per user and value")
        wanted = CountFilter(unit, since, until, user_id, key)
        counts = _read(lambda: self._reader.counts(wanted, MAX_COUNT_ROWS))
        body = {"bucket": unit, "from": _format(since), "to": _format(until)}
        if user_id is not None:
            body["user_id"] = user_id
        if key is not None:
            body["key"] = key
            body["counted_since"] = _format(counts.counted_since) if counts.counted_since else None
            body["counts"] = [{"start": _format(start), "value": value, "count": n}
                              for start, value, n in counts.rows]
            body["truncated"] = counts.truncated
        else:
            body["counts"] = [{"start": _format(start), "count": n} for start, n in counts.rows]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = encode(body)


def _invalid(name: str, description: str, limit: str | None = None) -> CollectorError:
    return CollectorError(falcon.HTTP_400, "Invalid parameter", description, field=name,
                          limit=limit)


def _parameters(req: falcon.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """Return the query parameters; refuse an unknown or repeated one."""
    for name, value in req.params.items():
        if name not in allowed:
            raise _invalid(name, f"unknown parameter {name!r}; allowed: {', '.join(allowed)}")
        if isinstance(value, list):
            raise _invalid(name, f"{name} is given more than once")
    return req.params


def _user_id(params: dict) -> int | None:
    value = params.get("user_id")
    if value is None:
        return None
    if not DIGITS.fullmatch(value) or int(value) > MAX_USER_ID:
        raise _invalid("user_id", f"user_id must be an integer from 0 to {MAX_USER_ID}")
    return int(value)


def _positive(params: dict, name: str, default: int) -> int:
    value = params.get(name)
    if value is None:
        return default
    if not DIGITS.fullmatch(value) or int(value) < 1:
        raise _invalid(name, f"{name} must be an integer >= 1")
    return int(value)


def _moment(params: dict, name: str) -> datetime.datetime | None:
    value = params.get(name)
    if value is None:
        return None
    try:
        moment = msgspec.convert(DECODED_PLUS.sub(r"+\1", value), datetime.datetime)
    except msgspec.ValidationError:
        raise _invalid(name, f"{name} {MOMENT_RULE}") from None
    # Like an event's timestamp, a date-time without an offset is read as UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _metadata(params: dict) -> str | None:
    """Return the `metadata` filter as canonical JSON text of an object, or None."""
    value = params.get("metadata")
    if value is None:
        return None
    if len(value.encode()) > MAX_FILTER_BYTES:
        raise _invalid("metadata", f"metadata is longer than {MAX_FILTER_BYTES} bytes",
                       limit="max_filter_bytes")
    rule = "metadata must be a JSON object, e.g. {\"page\": \"/home\"}"
    try:
        document = msgspec.json.decode(value)
        text = encode(document)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeEncodeError):
        raise _invalid("metadata", rule) from None
    if not isinstance(document, dict):
        raise _invalid("metadata", rule)
    if b"\\u0000" in text:
        raise _invalid("metadata", "metadata contains \\u0000, which PostgreSQL cannot store")
    return text.decode()


def _cursor(params: dict) -> Key | None:
    value = params.get("cursor")
    if value is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        timestamp, event_id = decode_cursor(raw)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise _invalid("cursor", "cursor must be the `next` of an earlier answer") from None
    if timestamp.tzinfo is None:
        raise _invalid("cursor", "cursor must be the `next` of an earlier answer")
    return Key(timestamp, str(event_id))


def encode_cursor(key: Key) -> str:
    """Return the opaque cursor of a page boundary: base64url of [timestamp, event_id]."""
    raw = encode([key.timestamp.isoformat(), key.event_id])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _bucket_range(params: dict, unit: str) -> tuple[datetime.datetime, datetime.datetime]:
    """Return the whole buckets from `from` to `to` (by default, DEFAULT_SPAN up to now)."""
    until = _moment(params, "to") or datetime.datetime.now(UTC)
    since = _moment(params, "from")
    try:
        since = _floor(since or until - DEFAULT_SPAN[unit], unit)
        until = _ceil(until, unit)
    except OverflowError:
        raise _invalid("from" if "from" in params else "to",
                       "from and to must lie within years 1 to 9999") from None
    if since >= until:
        raise _invalid("to", "to must be later than from")
    if (until - since) / UNIT_LENGTH[unit] > MAX_BUCKETS:
        raise _invalid("from", f"the range spans more than {MAX_BUCKETS} buckets of a "
                       f"{unit}; narrow it or use a longer bucket", limit="max_buckets")
    return since, until


def _floor(moment: datetime.datetime, unit: str) -> datetime.datetime:
    """Return the start of the UTC bucket of `unit` holding `moment`."""
    moment = moment.astimezone(UTC)
    if unit == "minute":
        return moment.replace(second=0, microsecond=0)
    if unit == "hour":
        return moment.replace(minute=0, second=0, microsecond=0)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _ceil(moment: datetime.datetime, unit: str) -> datetime.datetime:
    """Return the end of the UTC bucket of `unit` holding `moment` (itself if a boundary)."""
    start = _floor(moment, unit)
    return start if start == moment else start + UNIT_LENGTH[unit]


def _format(moment: datetime.datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _read(query):
    """Run a read, turning a failure into its HTTP answer."""
    try:
        return query()
    except ReadFailed as ex:
        if ex.reason == BUSY:
            raise CollectorError(falcon.HTTP_503, "Too many reads", str(ex),
                                 limit="read_pool_size",
                                 headers={"Retry-After": str(BUSY_RETRY_AFTER)}) from None
        if ex.reason == TIMEOUT:
            raise CollectorError(falcon.HTTP_503, "Query too slow",
                                 f"{ex}; narrow the range or add filters",
                                 limit="read_timeout") from None
        if ex.reason == REFUSED:
            raise CollectorError(falcon.HTTP_400, "Invalid parameter",
                                 f"PostgreSQL refused a value of the query: {ex}") from None
        raise CollectorError(falcon.HTTP_503, "Database unavailable",
                             "the read database (COLLECTOR_READ_DATABASE_URL, by default "
                             "DATABASE_URL) cannot answer now; retry later",
                             headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)}) from None
