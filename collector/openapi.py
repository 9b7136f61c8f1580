"""The OpenAPI 3.1 description of the API, served at GET /openapi.json.

Built once per app from the settings, so that the limits it states, and whether
write and read keys are needed, are the ones this collector enforces. The event schema is
the contract of collector/validation.py; tests/test_openapi.py fuzzes the running
server from this document and fails on any 5xx or any answer it does not describe.
"""

from collector.auth import KEY_HEADER
from collector.settings import Settings
from collector.validation import MAX_USER_ID

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
JSON = "application/json"
NDJSON = "application/x-ndjson"
BEACON = "text/plain"  # navigator.sendBeacon sends strings as text/plain
METRICS_TYPE = "text/plain"
# jsonb cannot hold a NUL in a string or key. Numbers past a double's range
# are refused too, but JSON Schema cannot say so of integers: the description does.
NO_NUL = "^[^\\x00]*$"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _response(name: str) -> dict:
    return {"$ref": f"#/components/responses/{name}"}


def _json(schema: dict) -> dict:
    return {JSON: {"schema": schema}}


def _schemas(settings: Settings) -> dict:
    error = {
        "type": "object",
        "description": "Every refusal: what went wrong, and the event field or the limit "
                       "at fault. Never echoes the payload.",
        "required": ["title", "description"],
        "properties": {
            "title": {"type": "string", "examples": ["Invalid field"]},
            "description": {"type": "string"},
            "field": {"type": "string", "description": "the event field at fault",
                      "examples": ["user_id"]},
            "limit": {"type": "string", "description": "the setting or rule exceeded",
                      "examples": ["max_event_bytes"]},
        },
        "additionalProperties": False,
    }
    refused_event = {
        "type": "object",
        "required": ["index", "title", "description"],
        "properties": {
            "index": {"type": "integer", "minimum": 0,
                      "description": "position of the event in the batch, from 0 "
                                     "(NDJSON: blank lines are not events)"},
            "title": {"type": "string"},
            "description": {"type": "string"},
            "field": {"type": "string"},
            "limit": {"type": "string"},
        },
        "additionalProperties": False,
    }
    accepted_event = {
        "type": "object",
        "required": ["index", "event_id"],
        "properties": {"index": {"type": "integer", "minimum": 0},
                       "event_id": {"type": "string", "format": "uuid"}},
        "additionalProperties": False,
    }
    return {
        "Event": {
            "type": "object",
            "description": "One clickstream event. Unknown fields are refused, so that a "
                           "typo such as userId is caught at once.",
            "required": ["user_id", "timestamp", "metadata"],
            "properties": {
                "user_id": {"type": "integer", "minimum": 0, "maximum": MAX_USER_ID,
                            "description": "PostgreSQL bigint; booleans and strings are "
                                           "not integers"},
                "timestamp": {"type": "string", "format": "date-time",
                              "description": "RFC 3339 date-time; one without an offset "
                                             "is read as UTC",
                              "examples": ["2024-05-01T12:00:00Z"]},
                "metadata": _ref("Metadata"),
                "event_id": {"type": ["string", "null"], "format": "uuid",
                             "description": "chosen by the client for idempotency: a "
                                            "repeat is accepted and stored once; "
                                            "assigned by the server when absent or null"},
            },
            "additionalProperties": False,
        },
        "Metadata": {
            "type": "object",
            "description": "any JSON object, stored as jsonb exactly as sent; at most "
                           f"{settings.max_metadata_depth} levels deep (max_metadata_depth), "
                           "no \\u0000 in a string or key, numbers within a double's range",
            "propertyNames": {"pattern": NO_NUL},
            "additionalProperties": _ref("JsonValue"),
            "examples": [{"page": "/home", "button": "buy"}],
        },
        "JsonValue": {"anyOf": [
            {"type": "null"},
            {"type": "boolean"},
            {"type": "number"},
            {"type": "string", "pattern": NO_NUL},
            {"type": "array", "items": _ref("JsonValue")},
            _ref("Metadata"),
        ]},
        "Accepted": {
            "type": "object",
            "required": ["status", "event_id"],
            "properties": {"status": {"const": "accepted"},
                           "event_id": {"type": "string", "format": "uuid"}},
            "additionalProperties": False,
        },
        "BatchResult": {
            "type": "object",
            "description": "Which events of a batch were accepted and which refused, and "
                           "why. The accepted ones were taken together.",
            "required": ["status", "accepted", "refused"],
            "properties": {
                "status": {"enum": ["accepted", "partial", "refused"]},
                "accepted": {"type": "array", "items": accepted_event},
                "refused": {"type": "array", "items": refused_event},
            },
            "additionalProperties": False,
        },
        "Error": error,
    }


def _errors(settings: Settings) -> dict:
    def error(description: str, headers: dict | None = None) -> dict:
        answer = {"description": description, "content": _json(_ref("Error"))}
        if headers:
            answer["headers"] = headers
        return answer

    return {
        "BadRequest": error("The body is not valid JSON or an event breaks the contract; "
                            "`field` names the field at fault."),
        "Unauthorized": error(
            "Keys are configured for this operation (write keys for POST, read keys for "
            "GET /events and /counts) and the request has none, or a wrong one; `limit` "
            "names the setting (api_keys, read_keys). A write key never opens a read.",
            {"WWW-Authenticate": {"schema": {"type": "string"}}}),
        "MethodNotAllowed": error("This path does not take this method.",
                                  {"Allow": {"schema": {"type": "string"}}}),
        "PayloadTooLarge": error(
            "A size limit is exceeded; `limit` names it (max_event_bytes, max_batch_bytes, "
            "max_batch_events, max_metadata_depth)."),
        "UnsupportedMediaType": error("The Content-Type or Content-Encoding is not "
                                      "accepted; `limit` names which."),
        "InvalidParameter": error("A query parameter is unknown, repeated or invalid; "
                                  "`field` names it."),
        "ReadUnavailable": error(
            "The read could not be served now: `limit` is read_pool_size (every read "
            "connection busy; Retry-After given) or read_timeout (the query was too slow); "
            "without `limit`, the read database (COLLECTOR_READ_DATABASE_URL, by default "
            "DATABASE_URL) cannot answer (Retry-After given).",
            {"Retry-After": {"schema": {"type": "integer"}}}),
        "BufferFull": error(
            "The collector's buffer is full: nothing of the request was accepted. Retry "
            "after the Retry-After seconds.",
            {"Retry-After": {"schema": {"type": "integer"}, "required": True}}),
    }


def _post(summary: str, description: str, content: dict, accepted: dict,
          bad_request: dict) -> dict:
    return {
        "summary": summary,
        "description": description,
        "requestBody": {"required": True, "content": content},
        "responses": {
            "202": accepted,
            "400": bad_request,
            "401": _response("Unauthorized"),
            "405": _response("MethodNotAllowed"),
            "413": _response("PayloadTooLarge"),
            "415": _response("UnsupportedMediaType"),
            "503": _response("BufferFull"),
        },
    }


def _preflight(path: str) -> dict:
    return {
        "summary": f"CORS preflight of POST {path}",
        "description": "Answered when COLLECTOR_CORS_ORIGINS allows the Origin: "
                       "Access-Control-Allow-Origin, -Methods and -Headers.",
        "parameters": [
            {"name": "Origin", "in": "header", "schema": {"type": "string"}},
            {"name": "Access-Control-Request-Method", "in": "header",
             "schema": {"type": "string"}},
            {"name": "Access-Control-Request-Headers", "in": "header",
             "schema": {"type": "string"}},
        ],
        "responses": {"200": {"description": "The methods allowed, in Allow (and, for "
                                              "an allowed origin, the CORS headers)."}},
    }


def _query(summary: str, description: str, parameters: dict[str, str]) -> dict:
    """Describe a GET whose query parameters are all optional strings checked by the server."""
    return {
        "summary": summary,
        "description": description,
        "parameters": [{"name": name, "in": "query", "required": False,
                        "description": meaning, "schema": {"type": "string"}}
                       for name, meaning in parameters.items()],
        "responses": {
            "200": {"description": "The answer.", "content": _json({"type": "object"})},
            "400": _response("InvalidParameter"),
            "401": _response("Unauthorized"),
            "405": _response("MethodNotAllowed"),
            "503": _response("ReadUnavailable"),
        },
    }


def openapi_document(settings: Settings) -> dict:
    """Describe every endpoint of the collector as an OpenAPI 3.1 document."""
    event = _ref("Event")
    gzip = ("The body may be sent with `Content-Encoding: gzip`; the limits apply to the "
            "decompressed bytes.")
    single = _post(
        "Send one event",
        f"Answered 202 as soon as the event is in the collector's spool. At most "
        f"{settings.max_event_bytes} bytes (max_event_bytes). {gzip} text/plain is "
        "accepted for navigator.sendBeacon.",
        {JSON: {"schema": event}, BEACON: {"schema": event}},
        {"description": "Accepted: the event will be stored once.",
         "content": _json(_ref("Accepted"))},
        _response("BadRequest"))
    # Each item is checked alone: one that is not an event is refused by its index, and
    # the others are still taken, so the batch itself holds any JSON values.
    batch = {"type": "array", "minItems": 1, "maxItems": settings.max_batch_events,
             "items": {"anyOf": [event, {"description": "not an event: refused alone"}]}}
    many = _post(
        "Send a batch of events",
        f"A JSON array of events, or NDJSON (one event a line). At most "
        f"{settings.max_batch_events} events (max_batch_events) and "
        f"{settings.max_batch_bytes} bytes (max_batch_bytes). Each event is accepted or "
        f"refused alone; the answer lists both, by index. {gzip}",
        {JSON: {"schema": batch}, NDJSON: {"schema": batch}, BEACON: {"schema": batch}},
        {"description": "At least one event accepted (status accepted or partial).",
         "content": _json(_ref("BatchResult"))},
        {"description": "The body is not a batch (an error), or no event of it is valid "
                        "(a BatchResult with status refused).",
         "content": _json({"anyOf": [_ref("Error"), _ref("BatchResult")]})})
    status_body = {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string"}}}
    document = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Firehose", "version": API_VERSION,
                 "description": "Clickstream events over HTTP, answered 202 at once and "
                                "batched into PostgreSQL."},
        "paths": {
            "/event": {"post": single, "options": _preflight("/event")},
            "/events": {"post": many, "options": _preflight("/events"), "get": _query(
                "Read stored events, newest first",
                "Filters combine; pages are keyset pages: pass `next` back as `cursor`.",
                {"user_id": "only this user's events",
                 "from": "RFC 3339, inclusive", "to": "RFC 3339, exclusive",
                 "metadata": "a JSON object the metadata must contain (jsonb @>)",
                 "limit": "events per page (default 100, at most 1000)",
                 "cursor": "the `next` of the previous page"})},
            "/counts": {"get": _query(
                "Count events per minute, hour or day",
                "Answered from rollups kept as events are stored, never a scan of events.",
                {"bucket": "minute, hour (default) or day",
                 "from": "RFC 3339", "to": "RFC 3339",
                 "user_id": "only this user's events",
                 "key": "a metadata key of COLLECTOR_ROLLUP_KEYS to count by value"})},
            "/health": {"get": {
                "summary": "This worker's counters and state",
                "responses": {"200": {"description": "The process is alive.",
                                      "content": _json(status_body)},
                              "405": _response("MethodNotAllowed")}}},
            "/ready": {"get": {
                "summary": "Whether this worker can take events",
                "responses": {"200": {"description": "Ready.", "content": _json(status_body)},
                              "503": {"description": "Not ready; `problems` says why.",
                                      "content": _json(status_body)},
                              "405": _response("MethodNotAllowed")}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics of every worker",
                "responses": {"200": {"description": "Prometheus text format.",
                                      "content": {METRICS_TYPE: {"schema": {"type": "string"}}}},
                              "405": _response("MethodNotAllowed")}}},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1.",
                                      "content": _json({"type": "object"})},
                              "405": _response("MethodNotAllowed")}}},
        },
        "components": {
            "schemas": _schemas(settings),
            "responses": _errors(settings),
            "securitySchemes": {
                "writeKey": {"type": "apiKey", "in": "header", "name": KEY_HEADER},
                "bearer": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "the write key as user name, no password"},
                # The same three headers, carrying a secret read key (COLLECTOR_READ_KEYS).
                "readKey": {"type": "apiKey", "in": "header", "name": KEY_HEADER,
                            "description": "a read key, secret: never a write key"},
                "readBearer": {"type": "http", "scheme": "bearer",
                               "description": "a read key as the bearer token"},
                "readBasic": {"type": "http", "scheme": "basic",
                              "description": "a read key as user name, no password"},
            },
        },
    }
    if settings.api_keys:
        for operation in (single, many):
            operation["security"] = [{"writeKey": []}, {"bearer": []}, {"basic": []}]
    if settings.read_keys:
        for operation in (document["paths"]["/events"]["get"],
                          document["paths"]["/counts"]["get"]):
            operation["security"] = [{"readKey": []}, {"readBearer": []}, {"readBasic": []}]
    return document
