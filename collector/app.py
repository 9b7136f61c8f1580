"""The WSGI application: `create_app(settings)` wires routes; `get_app()` reads the environment.

gunicorn loads `collector.app:get_app()` in each worker (gunicorn.conf.py), and its
hooks start and stop the worker's pipeline (`app.pipeline`).
"""

import logging
import sys

import falcon
import gevent

from collector.auth import ReadKeyAuth, WriteKeyAuth
from collector.cors import cors_middleware
from collector.errors import serialize_error
from collector.metrics import RequestCounter
from collector.openapi import openapi_document
from collector.pipeline import Pipeline
from collector.queries import CountResource, EventQueryResource
from collector.resources import (EventBatchResource, EventResource, HealthResource,
                                 MetricsResource, OpenApiResource, ReadyResource)
from collector.routing import SharedRoute
from collector.settings import Settings, SettingsError
from collector.validation import EventValidator
from storage.errors import OperationTimedOut
from storage.reader import EventReader
from storage.readpool import ReadPool
from storage.rollups import CountReader

logger = logging.getLogger(__name__)

READ_MARGIN = 2.0  # seconds past the read timeout before a read gives up client-side


class CollectorApp(falcon.App):
    """The falcon app, carrying the worker's pipeline for gunicorn's hooks."""

    pipeline: Pipeline


def create_app(settings: Settings, pipeline: Pipeline | None = None) -> CollectorApp:
    """Wire the resources to their routes around a pipeline (built from settings if absent)."""
    pipeline = pipeline or Pipeline(settings)
    validator = EventValidator(settings.max_metadata_depth)
    # Every answer is counted, carries the CORS headers, and only then is a key checked.
    middleware = [RequestCounter(pipeline.stats),
                  cors_middleware(settings.cors_origins),
                  WriteKeyAuth(settings.api_keys) if settings.api_keys else None,
                  ReadKeyAuth(settings.read_keys) if settings.read_keys else None]
    # No media handlers and no form parsing: bodies are read and parsed by us, with limits.
    app = CollectorApp(media_type=falcon.MEDIA_JSON,
                       middleware=[m for m in middleware if m is not None])
    app.req_options.auto_parse_form_urlencoded = False
    app.set_error_serializer(serialize_error)
    app.add_route("/event", EventResource(pipeline, validator, settings.max_event_bytes))
    reads = _read_pool(settings)
    # falcon serves a route with one resource: /events joins ingest (POST) and query (GET).
    app.add_route("/events", SharedRoute(
        post=EventBatchResource(pipeline, validator, settings.max_batch_bytes,
                                settings.max_batch_events),
        get=EventQueryResource(EventReader(reads))))
    app.add_route("/counts", CountResource(CountReader(reads), settings.rollup_keys))
    app.add_route("/health", HealthResource(pipeline))
    app.add_route("/ready", ReadyResource(pipeline))
    app.add_route("/metrics", MetricsResource(pipeline.stats.metrics))
    app.add_route("/openapi.json", OpenApiResource(openapi_document(settings)))
    app.pipeline = pipeline
    return app


def _read_pool(settings: Settings) -> ReadPool:
    """Build the worker's read connections (to COLLECTOR_READ_DATABASE_URL, by default
    DATABASE_URL); each round trip is bounded client-side too."""
    seconds = max(settings.read_timeout, settings.connect_timeout) + READ_MARGIN
    def bound() -> gevent.Timeout:
        # A fresh exception each time: greenlets reading at once must not share one.
        return gevent.Timeout(seconds, OperationTimedOut(f"no answer in {seconds:g} s"))

    return ReadPool(settings.read_database_url or settings.database_url,
                    settings.read_pool_size, settings.read_timeout,
                    wait_timeout=settings.read_timeout, bound=bound)


def get_app() -> CollectorApp:
    """Build the app from the environment; exit with a clear message on a bad setting."""
    try:
        settings = Settings.from_environ()
    except SettingsError as ex:
        print(f"firehose: configuration error: {ex}", file=sys.stderr)
        sys.exit(4)  # gunicorn's APP_LOAD_ERROR: the arbiter stops instead of respawning
    return create_app(settings)
