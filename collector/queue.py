"""The bounded per-worker queue between the request handlers and the flusher.

Every event is first appended to the worker's spool, then kept in memory for the
flusher. Past `capacity` events in memory the queue overflows: new events are only
in the spool, and the flusher reads them back from there, in order, once memory is
empty. So memory stays bounded, the disk budget of the spool bounds the rest, and
when that is used up (or the disk itself is full: SpoolDiskFull) `put` raises
SpoolFull and takes nothing, which the resource answers with 503.
"""

import collections
from typing import NamedTuple

import gevent.event
import msgspec

from collector.spool import Spool, SpoolPosition
from collector.validation import Event


class Queued(NamedTuple):
    """An event waiting for the flusher, and the spool segment that holds it."""

    segment: int
    event: Event


class EventQueue:
    """Events accepted by this worker and not yet durable in PostgreSQL, oldest first."""

    def __init__(self, spool: Spool, capacity: int, batch_size: int) -> None:
        self._spool = spool
        self.capacity = capacity
        self.batch_size = batch_size
        self._memory: collections.deque[Queued] = collections.deque()
        self._overflow_from: SpoolPosition | None = None
        self._in_flight_since: float | None = None  # received_at of the batch being written
        self._overflow_since = 0.0  # received_at of (about) the oldest event in overflow
        self.pending = 0  # accepted, not yet durable (memory, spool overflow, in flight)
        self._batch_ready = gevent.event.Event()
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Event).decode

    @property
    def depth(self) -> int:
        """Events held in memory."""
        return len(self._memory)

    @property
    def overflowing(self) -> bool:
        """Tell whether some events wait in the spool only."""
        return self._overflow_from is not None

    def put(self, events: list[Event]) -> None:
        """Accept events, all or none: append them to the spool, then queue them."""
        positions = self._spool.append([self._encode(e) for e in events])
        for position, event in zip(positions, events):
            if self._overflow_from is None and len(self._memory) < self.capacity:
                self._memory.append(Queued(position.segment, event))
            elif self._overflow_from is None:
                self._overflow_from = position
                self._overflow_since = event.received_at
        self.pending += len(events)
        if self.pending >= self.batch_size:
            self._batch_ready.set()
        self._spool.wait_durable()

    def take(self, limit: int, wait: float) -> list[Queued]:
        """Return up to `limit` of the oldest events, waiting up to `wait` s for a full batch."""
        if self.pending < limit and wait > 0:
            self._batch_ready.clear()
            self._batch_ready.wait(wait)
        batch: list[Queued] = []
        while self._memory and len(batch) < limit:
            batch.append(self._memory.popleft())
        if len(batch) < limit and self._overflow_from is not None:
            records, self._overflow_from = self._spool.read(self._overflow_from,
                                                            limit - len(batch))
            batch.extend(Queued(r.segment, self._decode(r.payload)) for r in records)
            if self._overflow_from == self._spool.end:
                self._overflow_from = None  # caught up: new events go to memory again
            elif batch:
                self._overflow_since = batch[-1].event.received_at
        if batch:
            self._in_flight_since = batch[0].event.received_at
        elif not self._memory and self._overflow_from is None:
            self.pending = 0  # records lost to spool corruption can never be taken
        return batch

    def wake(self) -> None:
        """Wake the flusher if it waits for a batch to fill."""
        self._batch_ready.set()

    def decode(self, payload: bytes) -> Event:
        """Turn a spool record's payload back into an Event."""
        return self._decode(payload)

    def done(self, batch: list[Queued]) -> None:
        """Record that a batch taken earlier is durable in PostgreSQL."""
        counts = collections.Counter(q.segment for q in batch)
        for segment, count in counts.items():
            self._spool.release(segment, count)
        self.pending -= len(batch)
        self._in_flight_since = None

    def oldest_age(self, now: float) -> float:
        """Seconds since the oldest event not yet durable was accepted (0 when none)."""
        if self._in_flight_since is not None:
            oldest = self._in_flight_since
        elif self._memory:
            oldest = self._memory[0].event.received_at
        elif self._overflow_from is not None:
            oldest = self._overflow_since
        else:
            return 0.0
        return max(0.0, now - oldest)
