"""The worker's counters: what it accepted, refused, flushed, retried and dead-lettered."""

import dataclasses


@dataclasses.dataclass
class WorkerStats:
    """Counts since this worker started, for /health (one worker's view)."""

    accepted: int = 0
    refused: int = 0
    flushed: int = 0  # durable in events (inserted or already there)
    duplicates: int = 0  # of flushed, event_ids that were already stored
    dead_lettered: int = 0
    replayed: int = 0  # events of dead workers' spools made durable by this worker
    retried: int = 0  # failed write attempts that were retried
    batches: int = 0
    last_flush_at: float | None = None
    last_error: str | None = None
    last_error_kind: str | None = None
    database_up: bool | None = None  # None until the first write attempt
    outage_since: float | None = None
    last_catch_up: dict | None = None  # backlog drained after the last outage, and how fast
