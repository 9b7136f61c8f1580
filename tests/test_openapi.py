"""The API against its own OpenAPI document: schemathesis fuzzes real gunicorn from /openapi.json.

Every operation gets up to MAX_EXAMPLES generated requests that follow the schema
and as many that break it. No answer may be a 5xx or differ from what the document
describes (status, content type, body schema, headers), and every event answered
202 must end up in PostgreSQL.
"""

import json
import time

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode

from tests.fixtures.collector import Collector
from tests.polling import wait_until

MAX_EXAMPLES = 150  # per operation and generation mode
FUZZ_DEADLINE = 300  # seconds for the whole fuzzing, on this 2-core machine
REQUEST_TIMEOUT = 10
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Every check stays on but one: "schema-valid data must be accepted" cannot hold for
# user_id, since JSON Schema counts 1.0 as an integer and the contract does not.
# Data that breaks the schema may also be refused for a limit (413: more than
# max_batch_events) or its media type (415), not only as invalid (400).
CONFIG = {"checks": {"positive_data_acceptance": {"enabled": False},
                     "negative_data_rejection": {"expected-statuses": ["400", "413", "415"]}}}


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value) -> bytes:
    """Send a generated batch as NDJSON: one JSON document a line."""
    if isinstance(value, list):
        return b"".join(json.dumps(item).encode() + b"\n" for item in value)
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """One collector for the fuzzing, with the default settings."""
    from tests.fixtures.postgres import TestDatabase  # a class named Test* is not a test here
    database = TestDatabase(postgres)
    database.reset()
    collector = Collector(database.url, tmp_path_factory.mktemp("spool") / "spool", {}, 1)
    collector.start()
    yield collector, database
    collector.terminate()


def accepted_ids(path: str, body: dict) -> list[str]:
    """Return the event_ids a 202 answer of POST /event or /events accepted."""
    if path == "/event":
        return [body["event_id"]]
    return [item["event_id"] for item in body["accepted"]]


@pytest.mark.slow
def test_fuzzed_requests_get_documented_answers_and_lose_no_event(server):
    collector, database = server
    schema = schemathesis.openapi.from_url(collector.url + "/openapi.json",
                                           config=schemathesis.Config.from_dict(CONFIG))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /event", "POST /events", "GET /health", "GET /ready", "GET /metrics"}
    deadline = time.monotonic() + FUZZ_DEADLINE
    accepted: list[str] = []
    statuses: dict[int, int] = {}
    session = requests.Session()

    for operation in operations:
        for mode in MODES:
            if mode is GenerationMode.NEGATIVE and not operation.body:
                continue  # only a body can break this schema: its headers are any strings
            @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def fuzz(case):
                assert time.monotonic() < deadline, f"fuzzing took over {FUZZ_DEADLINE} s"
                response = case.call_and_validate(session=session, timeout=REQUEST_TIMEOUT)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code == 202:
                    accepted.extend(accepted_ids(operation.path, response.json()))

            fuzz()

    print(f"\nfuzzing answers by status: {dict(sorted(statuses.items()))}; "
          f"{len(set(accepted))} events accepted")
    assert statuses.get(202) and statuses.get(400), statuses  # both kinds were exercised
    wait_until(lambda: set(accepted) <= set(database.event_ids()), 30,
               f"the {len(set(accepted))} accepted events in PostgreSQL")
    # Whatever PostgreSQL would refuse is refused at the edge.
    assert database.count("dead_letters") == 0, database.query("TABLE dead_letters")
    health = collector.health()
    assert health["accepted"] == len(accepted) and health["pending"] == 0, health
