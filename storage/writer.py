"""Write one batch of events to PostgreSQL with a single INSERT.

Two forms of that INSERT exist (INSERT_METHODS; `COLLECTOR_INSERT_METHOD` chooses):

- `execute_values`: psycopg2's execute_values, one VALUES row per event. Each row is a
  single pre-encoded JSON text, unpacked by PostgreSQL's jsonb_to_record, rather than
  five adapted literals: psycopg2 then quotes one string per event, not five values of
  four types (2.6 ms of the worker's CPU per 1,000 rows, against 7 ms in the
  five-literal form, during which its event loop serves no request).
- `json_recordset`: the whole batch as one JSON parameter, unpacked by
  jsonb_to_recordset.

Both parse the JSON as jsonb at once, so that each event's metadata is parsed once
(json_to_recordset parsed the document as json, then every metadata again as jsonb:
9% fewer rows/s in `scripts/bench_insert.py`, docs/performance.md).

Both run the same statement in PostgreSQL after the unpacking; docs/performance.md
gives their measured costs and why the default is the one it is.

A batch is one statement, committed whole (autocommit), or, when PostgreSQL refuses an event's content, split
in halves until each refused event is alone; those go to `dead_letters` with the
reason and the others are stored (one poison row aborts the whole transaction
otherwise). A repeated event (same `event_id`, `timestamp` and `user_id`,
as every retry and every spool replay is) is stored once (ON CONFLICT DO NOTHING).

Any other failure raises `WriteDeferred`: the caller keeps the batch and retries.
"""

import contextlib
import logging
from typing import Callable, ContextManager, NamedTuple, Sequence

import msgspec
import psycopg2.extensions
import psycopg2.extras

from storage.database import ensure_schema
from storage.errors import WriteFailure, classify_error

logger = logging.getLogger(__name__)
_ENCODER = msgspec.json.Encoder()

INSERT_COLUMNS = 'INSERT INTO events (event_id, user_id, "timestamp", metadata, received_at) '
UNPACKED = "e.i, e.u, e.t, e.m, to_timestamp(e.r)"
RECORD = "e(i uuid, u bigint, t timestamptz, m jsonb, r float8)"
ON_CONFLICT = ' ON CONFLICT ("timestamp", event_id, user_id) DO NOTHING'
INSERT_JSON_RECORDSET = (f"{INSERT_COLUMNS}SELECT {UNPACKED} "
                         f"FROM jsonb_to_recordset(%s::jsonb) AS {RECORD}{ON_CONFLICT}")
INSERT_EXECUTE_VALUES = (f"{INSERT_COLUMNS}SELECT {UNPACKED} "
                         f"FROM (VALUES %s) AS v(j), jsonb_to_record(v.j::jsonb) AS {RECORD}"
                         f"{ON_CONFLICT}")
INSERT_METHODS = ("execute_values", "json_recordset")
# An event refused again (a client's retry, a spool replay, `firehose dead-letters retry`)
# keeps its first payload and gets the latest reason and time.
INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (event_id, payload, error_code, error_message) "
    "VALUES (%s, %s, %s, %s) ON CONFLICT (event_id) DO UPDATE SET "
    "error_code = EXCLUDED.error_code, error_message = EXCLUDED.error_message, "
    "failed_at = EXCLUDED.failed_at"
)

Row = Sequence  # (event_id, user_id, timestamp, metadata, received_at)


class WriteResult(NamedTuple):
    """What became of a batch once it is durable in PostgreSQL."""

    inserted: int  # new rows in events
    duplicates: int  # event_ids already stored
    dead_lettered: int  # rows refused for their content, now in dead_letters


class WriteDeferred(Exception):
    """The batch could not be written now; keep it and retry later."""

    def __init__(self, failure: WriteFailure, cause: BaseException) -> None:
        super().__init__(f"{failure.value}: {_describe(cause)}")
        self.failure = failure
        self.cause = cause


class _JsonRow(msgspec.Struct):
    """One event as a JSON object of the INSERT (short keys: less to parse)."""

    i: str  # event_id
    u: int  # user_id
    t: str  # timestamp
    m: msgspec.Raw  # metadata, the client's JSON text as it is
    r: float  # received_at


class BatchWriter:
    """Owns one connection and writes batches through it; one greenlet uses it at a time."""

    def __init__(self, connect: Callable[[], psycopg2.extensions.connection],
                 bound: Callable[[], ContextManager] = contextlib.nullcontext,
                 insert_method: str = "json_recordset") -> None:
        if insert_method not in INSERT_METHODS:
            raise ValueError(f"insert method {insert_method!r}: expected one of "
                             f"{', '.join(INSERT_METHODS)}")
        self._insert_batch = (_insert_values if insert_method == "execute_values"
                              else _insert_recordset)
        self._connect = connect
        self._bound = bound  # a deadline around each round trip to PostgreSQL
        self._conn: psycopg2.extensions.connection | None = None
        self._schema_ready = False

    @property
    def connected(self) -> bool:
        """Tell whether a live connection is open."""
        return self._conn is not None and not self._conn.closed

    def prepare(self) -> None:
        """Connect and apply the schema now; raise WriteDeferred if PostgreSQL is not ready."""
        self._connection()

    def write(self, rows: Sequence[Row]) -> WriteResult:
        """Store the rows, dead-lettering the ones PostgreSQL refuses; raise WriteDeferred otherwise."""
        try:
            inserted = self._insert(rows)
        except WriteDeferred:
            raise
        except Exception as ex:
            failure = self._recover(ex)
            if failure is not WriteFailure.POISON:
                raise WriteDeferred(failure, ex) from ex
            return self._isolate(rows, ex)
        return WriteResult(inserted, len(rows) - inserted, 0)

    def close(self) -> None:
        """Close the connection, if any."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _connection(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            self._conn = None
            try:
                with self._bound():
                    conn = self._connect()
            except Exception as ex:
                raise WriteDeferred(classify_error(ex, connection_closed=True), ex) from ex
            self._conn = conn
        if not self._schema_ready:
            try:
                with self._bound():
                    ensure_schema(self._conn)
            except Exception as ex:
                raise WriteDeferred(self._recover(ex), ex) from ex
            self._schema_ready = True
        return self._conn

    def _insert(self, rows: Sequence[Row]) -> int:
        conn = self._connection()
        # The same event_id in two workers' batches (a client retry) must lock in the same
        # order in both, or ON CONFLICT's speculative insertions can deadlock.
        ordered = sorted(rows, key=_event_id)
        with self._bound(), conn.cursor() as cur:
            self._insert_batch(cur, ordered)
            inserted = cur.rowcount
        return inserted

    def _recover(self, ex: BaseException) -> WriteFailure:
        """Roll back after a failure and classify it; drop the connection if it is broken."""
        closed = self._conn is None or bool(self._conn.closed)
        if not closed:
            try:
                self._conn.rollback()
            except Exception:
                closed = True
        if closed:
            self.close()
        return classify_error(ex, connection_closed=closed)

    def _isolate(self, rows: Sequence[Row], ex: BaseException) -> WriteResult:
        """Split a refused batch until each refused row is alone, and dead-letter those."""
        if len(rows) == 1:
            self._dead_letter(rows[0], ex)
            return WriteResult(0, 0, 1)
        middle = len(rows) // 2
        first = self.write(rows[:middle])
        second = self.write(rows[middle:])
        return WriteResult(*(a + b for a, b in zip(first, second)))

    def _dead_letter(self, row: Row, ex: BaseException) -> None:
        event_id, user_id, timestamp, metadata, received_at = row
        payload = msgspec.json.encode({
            "event_id": event_id, "user_id": user_id, "timestamp": timestamp,
            "metadata": msgspec.Raw(metadata.encode("utf-8", "surrogatepass")),
            "received_at": received_at,
        })
        code = getattr(ex, "pgcode", None) or type(ex).__name__
        message = _describe(ex)
        # The error text can quote the row; keep it storable whatever it holds.
        message = message.replace("\x00", "\\u0000").encode("utf-8", "replace").decode()
        conn = self._connection()
        try:
            with self._bound(), conn.cursor() as cur:
                cur.execute(INSERT_DEAD_LETTER, (event_id, payload, code, message))
        except Exception as dead_ex:
            raise WriteDeferred(self._recover(dead_ex), dead_ex) from dead_ex
        logger.warning("event %s dead-lettered: %s %s", event_id, code, message)


def _insert_recordset(cur: psycopg2.extensions.cursor, rows: Sequence[Row]) -> None:
    """Insert the rows with one JSON parameter."""
    document = _ENCODER.encode([_JsonRow(e, u, t, msgspec.Raw(m), r) for e, u, t, m, r in rows])
    cur.execute(INSERT_JSON_RECORDSET, (document.decode(),))


def _insert_values(cur: psycopg2.extensions.cursor, rows: Sequence[Row]) -> None:
    """Insert the rows with execute_values: one VALUES row, one JSON text, per event."""
    encode = _ENCODER.encode
    texts = [(encode(_JsonRow(e, u, t, msgspec.Raw(m), r)).decode(),) for e, u, t, m, r in rows]
    psycopg2.extras.execute_values(cur, INSERT_EXECUTE_VALUES, texts, page_size=len(rows))


def _event_id(row: Row) -> str:
    return row[0]


def _describe(ex: BaseException) -> str:
    """Return a one-line description of an exception."""
    text = str(ex).strip().splitlines()
    return f"{type(ex).__name__}: {text[0] if text else ''}"
