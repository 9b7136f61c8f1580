"""POST /events through real gunicorn: each event accepted or refused by index, never half a batch."""

import json

from tests.client import make_event, post_json, request
from tests.polling import wait_until

NDJSON = {"Content-Type": "application/x-ndjson"}
# Nothing is flushed until the collector stops, so the spool fills up.
HOLD = {"COLLECTOR_FLUSH_INTERVAL": "600", "COLLECTOR_BATCH_SIZE": "100000"}


def ndjson(documents: list) -> bytes:
    return b"\n".join(json.dumps(d).encode() for d in documents) + b"\n"


def test_json_array_answers_each_event_by_index(collector, database):
    good = [make_event() for _ in range(3)]
    documents = [good[0], make_event(user_id=-1), good[1], make_event(userId=1), good[2]]
    answer = post_json(collector.url + "/events", documents)
    assert answer.status == 202, answer.body
    assert answer.body["status"] == "partial"
    assert answer.body["accepted"] == [{"index": i, "event_id": e["event_id"]}
                                       for i, e in zip((0, 2, 4), good)]
    refused = {r["index"]: r for r in answer.body["refused"]}
    assert set(refused) == {1, 3}
    assert refused[1]["field"] == "user_id" and "0 to" in refused[1]["description"]
    assert refused[3]["field"] == "userId"
    wait_until(lambda: sorted(database.event_ids()) == sorted(e["event_id"] for e in good), 10,
               "the three valid events' rows")


def test_ndjson_batch_skips_blank_lines_and_refuses_a_bad_line(collector, database):
    good = [make_event() for _ in range(3)]
    body = (json.dumps(good[0]).encode() + b"\r\n\n" + b'{"user_id": 1,\n'
            + json.dumps(good[1]).encode() + b"\n" + json.dumps(good[2]).encode())
    answer = request(collector.url + "/events", "POST", body, NDJSON)
    assert answer.status == 202, answer.body
    assert [a["index"] for a in answer.body["accepted"]] == [0, 2, 3]
    assert [a["event_id"] for a in answer.body["accepted"]] == [e["event_id"] for e in good]
    [bad] = answer.body["refused"]
    assert bad["index"] == 1 and "JSON" in bad["description"]
    wait_until(lambda: database.count() == 3, 10, "the three valid NDJSON events' rows")


def test_batch_with_no_valid_event_is_400_and_stores_nothing(collector, database):
    answer = post_json(collector.url + "/events", [make_event(user_id="1"), make_event(metadata=[])])
    assert answer.status == 400
    assert answer.body["status"] == "refused" and answer.body["accepted"] == []
    assert [(r["index"], r["field"]) for r in answer.body["refused"]] == [(0, "user_id"),
                                                                          (1, "metadata")]
    marker = make_event()
    assert post_json(collector.url + "/event", marker).status == 202
    wait_until(lambda: marker["event_id"] in database.event_ids(), 10, "a later event")
    assert database.count() == 1


def test_full_batch_of_5000_is_stored_completely(collector, database):
    events = [make_event() for _ in range(5000)]
    answer = request(collector.url + "/events", "POST", ndjson(events), NDJSON)
    assert answer.status == 202, answer.body
    assert answer.body["status"] == "accepted" and answer.body["refused"] == []
    assert len(answer.body["accepted"]) == 5000
    wait_until(lambda: database.count() == 5000, 30, "5000 rows")
    assert set(database.event_ids()) == {e["event_id"] for e in events}


def test_5001_events_is_413_naming_the_limit(collector, database):
    answer = post_json(collector.url + "/events", [make_event() for _ in range(5001)])
    assert answer.status == 413
    assert answer.body["limit"] == "max_batch_events"
    assert "5001" in answer.body["description"] and "5000" in answer.body["description"]
    marker = make_event()
    assert post_json(collector.url + "/event", marker).status == 202
    wait_until(lambda: marker["event_id"] in database.event_ids(), 10, "a later event")
    assert database.count() == 1


def test_configured_batch_limits(start_collector, database):
    collector = start_collector({"COLLECTOR_MAX_BATCH_EVENTS": "10",
                                 "COLLECTOR_MAX_BATCH_BYTES": "4096"}, workers=1)
    too_many = post_json(collector.url + "/events", [make_event() for _ in range(11)])
    assert too_many.status == 413 and too_many.body["limit"] == "max_batch_events"
    padded = [make_event(metadata={"pad": "x" * 500}) for _ in range(9)]
    too_big = request(collector.url + "/events", "POST", ndjson(padded), NDJSON)
    assert too_big.status == 413 and too_big.body["limit"] == "max_batch_bytes"
    fits = post_json(collector.url + "/events", [make_event() for _ in range(10)])
    assert fits.status == 202 and len(fits.body["accepted"]) == 10
    wait_until(lambda: database.count() == 10, 10, "the batch that fits")


def test_batch_is_taken_whole_or_refused_whole_when_the_spool_is_full(start_collector,
                                                                      database):
    collector = start_collector({**HOLD, "COLLECTOR_SPOOL_MAX_BYTES": "4096",
                                 "COLLECTOR_SPOOL_SEGMENT_BYTES": "4096"}, workers=1)
    taken, refused = [], []
    for _ in range(20):  # a few batches fill 4 KiB
        batch = [make_event() for _ in range(10)]
        answer = post_json(collector.url + "/events", batch)
        if answer.status == 503:
            assert answer.body["limit"] == "spool_max_bytes"
            assert answer.headers["retry-after"].isdigit()
            refused = [e["event_id"] for e in batch]
            break
        assert answer.status == 202, answer.body
        assert len(answer.body["accepted"]) == 10
        taken += [a["event_id"] for a in answer.body["accepted"]]
    assert taken and refused, "the spool never filled up"
    assert collector.terminate() == 0  # drains what was taken
    assert sorted(database.event_ids()) == sorted(taken)
