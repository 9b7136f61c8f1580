"""A conventional collector, the benchmark's peer: what a Python user would build instead.

FastAPI on uvicorn (uvloop, httptools), a pydantic model for the event, a bounded
asyncio.Queue per worker process and one task per worker that writes batches of at
most BATCH_SIZE events, or whatever came in FLUSH_INTERVAL seconds, with asyncpg's
COPY (`copy_records_to_table`). Each event is answered 202 as soon as it is queued.
It is a measuring stick, not part of Firehose: the benchmark installs it in a
virtualenv of its own (bench/peers/requirements.txt) and bench/peer.py starts it as

    uvicorn --app-dir bench/peers fastapi_peer:app --workers 2 --loop uvloop --http httptools \
            --lifespan on --no-access-log

with PEER_DATABASE_URL in its environment. It takes Firehose's event contract, so that
the same load runs against both: POST /event (user_id an integer >= 0, timestamp a
date-time, metadata an object, event_id an optional UUID; unknown fields refused 422)
answers 202 {"status": "accepted", "event_id": ...}, or 503 with Retry-After when the
worker's queue is full; POST /events takes a JSON array of such events. GET /health
gives this worker's counters (accepted, pending), which the benchmark polls as it does
Firehose's. Rows go to `peer_events`, created at start beside Firehose's `events`, with
the same columns and a primary key on event_id.

What it keeps of Firehose's design: 202 before the write, a bounded memory queue per
worker with 503 when it is full, batched writes off the request path, one key on
event_id, the same validation of each field.

What it lacks, as a conventional collector does:
- no spool: an event answered 202 lives only in the worker's memory until its COPY
  commits; a crash, a kill or a drain longer than uvicorn's shutdown loses it;
- no ON CONFLICT through COPY: a repeated event_id fails its whole batch with a
  unique violation, and so does any event PostgreSQL refuses (a \\u0000 in metadata,
  which jsonb cannot hold): the batch is logged and dropped, there is no dead-letter
  table and no bisecting;
- a batch is refused whole (422) when one of its events is invalid (FastAPI validates
  `list[Event]` as one body), where Firehose takes the valid ones;
- no body size limit beyond the batch's event count, no partitions, no indexes but
  the primary key, no rollup trigger (Firehose's `events` has a user_id index, a GIN
  index on metadata and a trigger counting events per minute, hour and day);
- during a database outage it retries the batch every RETRY_DELAY seconds, with no
  backoff and no jitter, while its queue fills up.
"""

import asyncio
import contextlib
import datetime
import json
import logging
import os
import uuid
from typing import Annotated, Any

import asyncpg
from fastapi import Body, FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

BATCH_SIZE = 1000  # events in one COPY at most
FLUSH_INTERVAL = 0.2  # seconds the writer waits for a batch to fill
QUEUE_CAPACITY = 50_000  # events one worker holds at most (Firehose's default queue)
MAX_BATCH_EVENTS = 5_000  # events in one POST /events at most (Firehose's default)
RETRY_AFTER = 5  # seconds a client is told to wait when the queue is full
RETRY_DELAY = 1.0  # seconds between attempts at a batch PostgreSQL could not take
DRAIN_TIMEOUT = 20.0  # seconds a stopping worker waits for its queue to reach PostgreSQL
BIGINT_MAX = 2**63 - 1
TABLE = "peer_events"
COLUMNS = ("event_id", "user_id", "timestamp", "metadata", "received_at")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    event_id     uuid        PRIMARY KEY,
    user_id      bigint      NOT NULL,
    "timestamp"  timestamptz NOT NULL,
    metadata     jsonb       NOT NULL,
    received_at  timestamptz NOT NULL
)
"""
SCHEMA_LOCK = 7_330_001  # advisory lock key: two workers creating the table at once collide
RETRIED = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError,
           asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.LockNotAvailableError)

logger = logging.getLogger("uvicorn.error")  # uvicorn's handler and format: "ERROR:    ..."


class Event(BaseModel):
    """One clickstream event, as POST /event takes it."""

    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[StrictInt, Field(ge=0, le=BIGINT_MAX)]  # booleans and strings refused
    timestamp: datetime.datetime
    metadata: dict[str, Any]
    event_id: uuid.UUID | None = None

    @field_validator("timestamp", mode="before")
    @classmethod
    def _date_time_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("expected an RFC 3339 date-time string")
        return value

    @field_validator("timestamp")
    @classmethod
    def _utc_when_naive(cls, value: datetime.datetime) -> datetime.datetime:
        # Firehose reads a date-time without an offset as UTC; so does the peer.
        return value if value.tzinfo else value.replace(tzinfo=datetime.timezone.utc)


class Writer:
    """One worker's queue and the task that copies it to PostgreSQL in batches."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CAPACITY)
        self.accepted = 0
        self.written = 0
        self.dropped = 0
        self.pool: asyncpg.Pool | None = None
        self.task: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        """Return the events accepted and neither committed nor dropped."""
        return self.accepted - self.written - self.dropped

    async def start(self) -> None:
        """Connect, create the table if it is missing, start the writing task."""
        self.pool = await asyncpg.create_pool(self.url, min_size=1, max_size=1)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(SCHEMA)
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Let the queue drain (up to DRAIN_TIMEOUT), then stop the task and disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while self.pending and loop.time() < deadline and not self.task.done():
            await asyncio.sleep(FLUSH_INTERVAL)
        if self.pending:
            logger.warning("stopping with %d events not written: they are lost", self.pending)
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.pool.close()

    def put(self, records: list[tuple]) -> None:
        """Queue these rows, all of them or (503) none."""
        if self.queue.maxsize - self.queue.qsize() < len(records):
            raise HTTPException(503, "queue full, retry later",
                                headers={"Retry-After": str(RETRY_AFTER)})
        for record in records:
            self.queue.put_nowait(record)
        self.accepted += len(records)

    async def _next_batch(self) -> list[tuple]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + FLUSH_INTERVAL
        while len(batch) < BATCH_SIZE:
            if self.queue.empty():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            else:
                batch.append(self.queue.get_nowait())
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            while True:
                try:
                    async with self.pool.acquire() as conn:
                        await conn.copy_records_to_table(TABLE, records=batch, columns=COLUMNS)
                    self.written += len(batch)
                    break
                except RETRIED as ex:
                    logger.warning("batch of %d not written, retrying in %g s: %s",
                                   len(batch), RETRY_DELAY, ex)
                    await asyncio.sleep(RETRY_DELAY)
                except asyncpg.PostgresError as ex:
                    logger.error("batch of %d dropped: %s", len(batch), ex)
                    self.dropped += len(batch)
                    break


writer = Writer(os.environ.get("PEER_DATABASE_URL", ""))


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    await writer.start()
    yield
    await writer.stop()


app = FastAPI(lifespan=lifespan)


def _record(event: Event, received_at: datetime.datetime) -> tuple:
    event_id = event.event_id or uuid.uuid4()
    return (event_id, event.user_id, event.timestamp, json.dumps(event.metadata), received_at)


@app.post("/event", status_code=202)
async def post_event(event: Event) -> dict:
    record = _record(event, datetime.datetime.now(datetime.timezone.utc))
    writer.put([record])
    return {"status": "accepted", "event_id": str(record[0])}


@app.post("/events", status_code=202)
async def post_events(events: Annotated[list[Event], Body(min_length=1,
                                                             max_length=MAX_BATCH_EVENTS)]
                      ) -> dict:
    received_at = datetime.datetime.now(datetime.timezone.utc)
    records = [_record(event, received_at) for event in events]
    writer.put(records)
    return {"status": "accepted",
            "accepted": [{"index": i, "event_id": str(r[0])} for i, r in enumerate(records)],
            "refused": []}


@app.get("/health")
async def health() -> dict:
    return {"worker_pid": os.getpid(), "writer_alive": not writer.task.done(),
            "accepted": writer.accepted, "pending": writer.pending,
            "written": writer.written, "dropped": writer.dropped,
            "queue_depth": writer.queue.qsize()}
