"""Read stored events back: filters, newest first, one keyset page at a time.

A page is ordered by ("timestamp", event_id), newest first, and the next page starts
strictly after the last row of this one (keyset pagination, never OFFSET): every
page is one index range scan however deep the client has read, and an event stored
meanwhile neither shifts rows between pages nor repeats one. An event arriving with
a timestamp older than the page boundary shows up on a page still to be read; one
newer than the first page shows up when the client starts over.

The WHERE clause is put together from fixed conditions, one per filter given; every
value is a query parameter.
"""

import datetime
from typing import NamedTuple

from storage.readpool import ReadPool

# Each row as the JSON object of its columns, made by PostgreSQL: metadata is passed
# through as text, never decoded and encoded again in the worker. The key columns are
# selected as they are: an output column `event_id::text` would be what ORDER BY
# event_id sorts by, as text, and no index has that order.
SELECT_EVENTS = 'SELECT row_to_json(events)::text, "timestamp", event_id FROM events'
CONDITIONS = {
    "user_id": "user_id = %(user_id)s",
    "since": '"timestamp" >= %(since)s',
    "until": '"timestamp" < %(until)s',
    "metadata": "metadata @> %(metadata)s::jsonb",
    "after": '("timestamp", event_id) < (%(after_timestamp)s, %(after_event_id)s::uuid)',
}
ORDER_AND_LIMIT = ' ORDER BY "timestamp" DESC, event_id DESC LIMIT %(limit)s'


class Key(NamedTuple):
    """Where a page ends: the ("timestamp", event_id) of its last row."""

    timestamp: datetime.datetime
    event_id: str


class EventFilter(NamedTuple):
    """What GET /events asks for; None leaves a filter out."""

    user_id: int | None = None
    since: datetime.datetime | None = None  # inclusive
    until: datetime.datetime | None = None  # exclusive
    metadata: str | None = None  # a JSON object the event's metadata must contain
    after: Key | None = None  # continue after this row of the previous page


class EventPage(NamedTuple):
    """One page: each event as JSON text, and the key to continue from (None at the end)."""

    events: list[str]
    next_key: Key | None


def events_query(wanted: EventFilter, limit: int) -> tuple[str, dict]:
    """Return the SQL and parameters of one page of `limit` events, plus one to look ahead."""
    params = {"limit": limit + 1}
    where = []
    for name, condition in CONDITIONS.items():
        value = getattr(wanted, name)
        if value is None:
            continue
        where.append(condition)
        if name == "after":
            params["after_timestamp"], params["after_event_id"] = value
        else:
            params[name] = value
    query = SELECT_EVENTS + (" WHERE " + " AND ".join(where) if where else "")
    return query + ORDER_AND_LIMIT, params


class EventReader:
    """Answers event queries through the worker's read connections."""

    def __init__(self, pool: ReadPool) -> None:
        self._pool = pool

    def page(self, wanted: EventFilter, limit: int) -> EventPage:
        """Return up to `limit` events, newest first; raise ReadFailed if it cannot."""
        rows = self._pool.fetch(*events_query(wanted, limit))
        more = len(rows) > limit
        rows = rows[:limit]
        next_key = Key(rows[-1][1], rows[-1][2]) if more else None
        return EventPage([row[0] for row in rows], next_key)
