"""The HTTP resources: POST /event and /events take events; the others report and describe."""

import falcon
import msgspec
import prometheus_client

from collector.body import BATCH_TYPES, JSON_TYPES, read_body
from collector.errors import CollectorError, error_body, rejected
from collector.metrics import Metrics
from collector.pipeline import Pipeline
from collector.spool import SpoolFull
from collector.validation import ENVELOPE_FIELDS, EventRejected, EventValidator

RETRY_AFTER = 5  # seconds a client is told to wait when the buffer is full

encode = msgspec.json.Encoder().encode


def _buffer_full(ex: SpoolFull) -> CollectorError:
    # ex.limit: spool_max_bytes (the budget is used up) or spool_disk (the disk is full).
    return CollectorError(falcon.HTTP_503, "Buffer full",
                          f"the collector cannot take more events now: {ex}; retry later",
                          limit=ex.limit, headers={"Retry-After": str(RETRY_AFTER)})


def refusal_reason(field: str | None, limit: str | None) -> str:
    """Name what an event was refused for, from a bounded set (a metric's label).

    The limit if one was exceeded, else the contract's field at fault; a client's
    unknown field name is never used as is, so clients cannot add labels.
    """
    if limit is not None:
        return limit
    if field is None:
        return "body"
    return field if field in ENVELOPE_FIELDS else "unknown_field"


class EventResource:
    """POST /event: one event, answered 202 once it is in the spool."""

    write_key_required = True  # collector/auth.py

    def __init__(self, pipeline: Pipeline, validator: EventValidator, max_bytes: int) -> None:
        self._pipeline = pipeline
        self._validator = validator
        self._max_bytes = max_bytes

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        stats = self._pipeline.stats
        try:
            body = read_body(req, self._max_bytes, "max_event_bytes", JSON_TYPES)
        except CollectorError as ex:
            stats.count_refused(refusal_reason(None, ex.limit))
            raise
        try:
            event = self._validator.parse_event(body)
        except EventRejected as ex:
            stats.count_refused(refusal_reason(ex.field, ex.limit))
            raise rejected(ex) from None
        try:
            self._pipeline.accept([event])
        except SpoolFull as ex:
            raise _buffer_full(ex) from None
        resp.status = falcon.HTTP_202
        resp.content_type = falcon.MEDIA_JSON
        resp.data = b'{"status":"accepted","event_id":"' + event.event_id.encode() + b'"}'


class EventBatchResource:
    """POST /events: many events, as a JSON array or NDJSON; each accepted or refused alone.

    The valid events of a batch are accepted together or, when the spool is full, not
    at all (503): a batch is never half taken.
    """

    write_key_required = True  # collector/auth.py

    def __init__(self, pipeline: Pipeline, validator: EventValidator, max_bytes: int,
                 max_events: int) -> None:
        self._pipeline = pipeline
        self._validator = validator
        self._max_bytes = max_bytes
        self._max_events = max_events

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = read_body(req, self._max_bytes, "max_batch_bytes", BATCH_TYPES)
        ndjson = (req.content_type or "").lower().startswith("application/x-ndjson")
        try:
            documents = self._validator.parse_documents(body, ndjson)
        except EventRejected as ex:
            raise rejected(ex) from None
        if not documents:
            raise CollectorError(falcon.HTTP_400, "Invalid body", "the batch holds no events")
        if len(documents) > self._max_events:
            self._pipeline.stats.count_refused("max_batch_events", len(documents))
            raise CollectorError(falcon.HTTP_413, "Payload too large",
                                 f"the batch holds {len(documents)} events; "
                                 f"at most {self._max_events} are accepted",
                                 limit="max_batch_events")
        events, accepted, refused = [], [], []
        stats = self._pipeline.stats
        for index, document in enumerate(documents):
            try:
                event = self._validator.parse_event(document)
            except EventRejected as ex:
                stats.count_refused(refusal_reason(ex.field, ex.limit))
                refused.append({"index": index, **error_body(
                    "Invalid field" if ex.field else "Invalid event", ex.description,
                    ex.field, ex.limit)})
                continue
            events.append(event)
            accepted.append({"index": index, "event_id": event.event_id})
        if events:
            try:
                self._pipeline.accept(events)  # all of them or none
            except SpoolFull as ex:
                raise _buffer_full(ex) from None
        resp.status = falcon.HTTP_202 if events else falcon.HTTP_400
        resp.content_type = falcon.MEDIA_JSON
        resp.data = encode({
            "status": "accepted" if not refused else ("partial" if events else "refused"),
            "accepted": accepted,
            "refused": refused,
        })


class HealthResource:
    """GET /health: the process is alive; this worker's counters. HEAD: the same, no body."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = encode(self._pipeline.health())

    # falcon answers HEAD with on_get's status and headers (Content-Length included) and
    # drops the body; a load balancer's HEAD check sees what GET would.
    on_head = on_get


class ReadyResource:
    """GET /ready: this worker can take events (flusher running, spool not full). HEAD too."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        ready, body = self._pipeline.readiness()
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.content_type = falcon.MEDIA_JSON
        resp.data = encode(body)

    on_head = on_get  # the same status (503 when not ready), without the body


class MetricsResource:
    """GET /metrics: the counters of every worker, in Prometheus' text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = prometheus_client.CONTENT_TYPE_LATEST
        resp.data = self._metrics.exposition()


class OpenApiResource:
    """GET /openapi.json: the OpenAPI description of this API."""

    def __init__(self, document: dict) -> None:
        self._body = encode(document)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_JSON
        resp.data = self._body
