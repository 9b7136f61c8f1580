"""Dead letters: list them, show one, write them again once their cause is fixed, purge old ones.

A dead letter (storage/writer.py `BatchWriter._dead_letter`) holds the event as the writer
had it, as JSON bytes: `{"event_id", "user_id", "timestamp", "metadata", "received_at"}`,
`metadata` being the client's JSON text as it came. A retry decodes that back into the row
the flusher would have written and hands it to a `BatchWriter`, so it goes through the same
INSERT, the same ON CONFLICT and the same dead-lettering as any event. A dead letter leaves
`dead_letters` only once its event is in `events`: a retry that is interrupted, or run
twice, stores the event once; one still refused stays, with the new reason.
"""

import datetime
import uuid
from typing import Iterator, NamedTuple, Sequence

import msgspec
import psycopg2.extensions

from storage.writer import BatchWriter, Row, WriteResult

RETRY_BATCH = 500  # dead letters written per INSERT by a retry of all of them

COLUMNS = "event_id::text, error_code, error_message, failed_at, length(payload)"
LIST = f"SELECT {COLUMNS} FROM dead_letters ORDER BY failed_at, event_id LIMIT %s"
COUNT = "SELECT count(*) FROM dead_letters"
SHOW = f"SELECT {COLUMNS}, payload FROM dead_letters WHERE event_id = %s"
BY_IDS = ("SELECT event_id::text, payload FROM dead_letters "
          "WHERE event_id = ANY(%s::uuid[]) ORDER BY event_id")
NEXT_BATCH = ("SELECT event_id::text, payload FROM dead_letters "
              "WHERE event_id > %s ORDER BY event_id LIMIT %s")
# The unique key of events is ("timestamp", event_id, user_id): a dead letter whose event
# is now stored under that key is done with, and only such a one.
DELETE_STORED = (
    "DELETE FROM dead_letters d "
    "USING unnest(%s::uuid[], %s::timestamptz[], %s::bigint[]) AS r (event_id, ts, user_id) "
    "WHERE d.event_id = r.event_id AND EXISTS (SELECT 1 FROM events e "
    'WHERE e."timestamp" = r.ts AND e.event_id = r.event_id AND e.user_id = r.user_id) '
    "RETURNING d.event_id::text"
)
REASONS = ("SELECT event_id::text, error_code, error_message FROM dead_letters "
           "WHERE event_id = ANY(%s::uuid[])")
PURGE = "DELETE FROM dead_letters WHERE failed_at < now() - make_interval(days => %s)"


class DeadLetter(NamedTuple):
    """One dead letter as listed: its event, why it was refused, when, and its size."""

    event_id: str
    error_code: str
    error_message: str
    failed_at: datetime.datetime
    payload_bytes: int


class Outcome(NamedTuple):
    """What a retry did with one dead letter."""

    event_id: str
    stored: bool  # in events now, and gone from dead_letters
    reason: str  # when not stored: why (the new refusal, or an unreadable payload)


class _Payload(msgspec.Struct):
    """A dead letter's payload, as BatchWriter._dead_letter encodes it."""

    event_id: str
    user_id: int
    timestamp: str
    metadata: msgspec.Raw
    received_at: float


_DECODER = msgspec.json.Decoder(_Payload)


def count(conn: psycopg2.extensions.connection) -> int:
    """Return the number of dead letters."""
    with conn.cursor() as cur:
        cur.execute(COUNT)
        return cur.fetchone()[0]


def list_dead_letters(conn: psycopg2.extensions.connection, limit: int) -> list[DeadLetter]:
    """Return up to `limit` dead letters, the oldest first."""
    with conn.cursor() as cur:
        cur.execute(LIST, (limit,))
        return [DeadLetter(*row) for row in cur.fetchall()]


def show(conn: psycopg2.extensions.connection,
         event_id: uuid.UUID) -> tuple[DeadLetter, bytes] | None:
    """Return one dead letter and its raw payload, or None if there is none of that id."""
    with conn.cursor() as cur:
        cur.execute(SHOW, (str(event_id),))
        row = cur.fetchone()
    if row is None:
        return None
    return DeadLetter(*row[:5]), bytes(row[5])


def row_of(payload: bytes) -> Row:
    """Turn a dead letter's payload back into the row the writer takes; raise ValueError."""
    try:
        event = _DECODER.decode(payload)
    except msgspec.DecodeError as ex:
        raise ValueError(f"payload unreadable: {ex}") from None
    # The writer encoded the metadata text with surrogatepass: undo exactly that.
    metadata = bytes(event.metadata).decode("utf-8", "surrogatepass")
    event_id = str(uuid.UUID(event.event_id))  # ValueError if it is not one
    return (event_id, event.user_id, event.timestamp, metadata, event.received_at)


def retry(conn: psycopg2.extensions.connection, writer: BatchWriter,
          event_ids: Sequence[uuid.UUID] | None = None) -> Iterator[Outcome]:
    """Write dead letters again, the ones of `event_ids` or (None) all; yield each outcome.

    Raises storage.writer.WriteDeferred when PostgreSQL cannot take them now; the dead
    letters not yet retried are then untouched. `conn` is autocommit.
    """
    if event_ids is not None:
        ids = [str(i) for i in event_ids]
        for start in range(0, len(ids), RETRY_BATCH):
            with conn.cursor() as cur:
                cur.execute(BY_IDS, (ids[start:start + RETRY_BATCH],))
                letters = cur.fetchall()
            yield from _retry_batch(conn, writer, letters)
        return
    after = str(uuid.UUID(int=0))
    while True:
        with conn.cursor() as cur:
            cur.execute(NEXT_BATCH, (after, RETRY_BATCH))
            letters = cur.fetchall()
        if not letters:
            return
        after = letters[-1][0]  # still-refused ones stay behind, so page by event_id
        yield from _retry_batch(conn, writer, letters)


def purge(conn: psycopg2.extensions.connection, older_than_days: int) -> int:
    """Delete the dead letters that failed more than `older_than_days` ago; return how many."""
    with conn.cursor() as cur:
        cur.execute(PURGE, (older_than_days,))
        return cur.rowcount


def _retry_batch(conn: psycopg2.extensions.connection, writer: BatchWriter,
                 letters: list[tuple]) -> Iterator[Outcome]:
    rows: list[Row] = []
    unreadable: list[Outcome] = []
    for event_id, payload in letters:
        try:
            rows.append(row_of(bytes(payload)))
        except ValueError as ex:
            unreadable.append(Outcome(event_id, False, str(ex)))
    result = writer.write(rows) if rows else WriteResult(0, 0, 0)
    stored: set[str] = set()
    refused: dict[str, str] = {}
    if rows:
        with conn.cursor() as cur:
            cur.execute(DELETE_STORED, ([r[0] for r in rows], [r[2] for r in rows],
                                        [r[1] for r in rows]))
            stored = {row[0] for row in cur.fetchall()}
        if result.dead_lettered or len(stored) < len(rows):
            with conn.cursor() as cur:
                cur.execute(REASONS, ([r[0] for r in rows if r[0] not in stored],))
                refused = {event_id: f"{code} {message}" for event_id, code, message
                           in cur.fetchall()}
    for row in rows:
        event_id = row[0]
        if event_id in stored:
            yield Outcome(event_id, True, "")
        else:
            yield Outcome(event_id, False, refused.get(event_id, "not stored"))
    yield from unreadable
