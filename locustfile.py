"""Locust load test of Firehose: many devices sending realistic clickstream events.

    locust -f locustfile.py --headless -u 1000 -r 200 -t 60s --stop-timeout 10 \\
        --host http://127.0.0.1:8000

Each simulated user is one device that sends an event about once a second (the
think time), mostly one at a time (POST /event), sometimes a batch of 20-100
(POST /events), and about 1% deliberately bad events that the collector must
refuse with 400 (locust counts those 400s as successes).

Every event carries an `event_id` (uuid4) chosen here, so the number of events
answered 202 can be compared with the rows in PostgreSQL. At the end each locust
process that ran users prints how many events were answered 202 and, when
`--accepted-file PATH` (env LOCUST_ACCEPTED_FILE) is given, writes that number
to PATH; with `--processes N` each worker process writes `PATH.<pid>` instead.
Then, after the collector has flushed:

    cat "$LOCUST_ACCEPTED_FILE"* | awk '{s += $1} END {print s}'   # events accepted
    psql "$DATABASE_URL" -Atc 'select count(*) from events'        # the same number

Use `--stop-timeout` (a few seconds) so that locust lets each user finish the
request it is making when the time is up: with the default of 0 users are killed
mid-request, and an event the collector stored may never be counted here.
`--think-time 0` removes the pause between requests, to see how many requests per
second locust itself can drive (about 3k per process on 2 cores: use wrk, as `make bench` does, for throughput).
"""

import datetime
import json
import os
import random
import uuid

from locust import FastHttpUser, events, task
from locust.runners import MasterRunner, WorkerRunner

# A device sends an event every THINK_TIME seconds on average (0.5-1.5 s), so
# `-u 1000` is 1000 concurrent devices offering ~1000 events/s: a load one locust
# process can drive without its own CPU becoming the bottleneck. With no think
# time, 1000 users would only be 1000 busy loops capped by locust's CPU.
DEFAULT_THINK_TIME = 1.0
THINK_JITTER = 0.5  # the wait is uniform in think_time * (1 ± THINK_JITTER)

BAD_EVENT_SHARE = 0.01  # deliberately invalid events, which must get 400
BATCH_MIN, BATCH_MAX = 20, 100  # events in one POST /events
HOT_USERS = 50  # a few very active users ...
HOT_USER_SHARE = 0.3  # ... send this share of all events
COLD_USERS = 5_000_000  # the long tail of users seen rarely
JSON_HEADERS = {"Content-Type": "application/json"}

EVENT_TYPES = ("page_view", "page_view", "page_view", "click", "scroll", "add_to_cart",
               "search", "purchase")
PAGES = ("/", "/products", "/products/{n}", "/cart", "/checkout", "/search", "/blog/{n}",
         "/account/orders")
REFERRERS = ("https://www.google.com/", "https://duckduckgo.com/?q=caf%C3%A9",
             "https://t.co/abc123", "", "https://news.example.org/article?id={n}")
DEVICES = ({"os": "Android", "version": "14"}, {"os": "iOS", "version": "17.4.1"},
           {"os": "Windows", "version": "11"}, {"os": "macOS", "version": "14.3"},
           {"os": "Linux", "version": "6.1"})
UTM = ({"source": "newsletter", "medium": "email", "campaign": "spring-sale"},
       {"source": "google", "medium": "cpc", "campaign": "brand", "term": "café crème"},
       {"source": "facebook", "medium": "social", "campaign": "été-2024"}, {})
TEXTS = ("Café crème ☕", "naïve résumé", "日本語のテキスト", "emoji 🚀🔥", "Ελληνικά",
         "quotes \"and\" back\\slashes", "plain ascii")
OFFSETS = (datetime.timedelta(hours=2), datetime.timedelta(hours=-5),
           datetime.timedelta(hours=5, minutes=30), datetime.timedelta(hours=9))


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    """Add this locustfile's options (also settable as LOCUST_* environment variables)."""
    parser.add_argument("--accepted-file", type=str, env_var="LOCUST_ACCEPTED_FILE", default="",
                        help="write the number of events answered 202 to this file "
                             "(PATH.<pid> per worker process with --processes)")
    parser.add_argument("--think-time", type=float, env_var="LOCUST_THINK_TIME",
                        default=DEFAULT_THINK_TIME,
                        help="mean seconds each user waits between requests (0: none)")


class AcceptedCount:
    """The number of events this locust process got a 202 for."""

    def __init__(self) -> None:
        self.events = 0

    def add(self, count: int) -> None:
        """Count events the collector accepted."""
        self.events += count

    def report(self, environment) -> None:
        """Print the count and write it where --accepted-file says."""
        runner = environment.runner
        if isinstance(runner, MasterRunner):
            return  # the master runs no users; each worker reports its own count
        path = environment.parsed_options.accepted_file if environment.parsed_options else ""
        if path and isinstance(runner, WorkerRunner):
            path = f"{path}.{os.getpid()}"
        note = ""
        if not environment.stop_timeout:
            note = " (without --stop-timeout, requests cut off at the end are not counted)"
        print(f"firehose: events accepted (202) by process {os.getpid()}: {self.events}{note}",
              flush=True)
        if path:
            with open(path, "w") as out:
                out.write(f"{self.events}\n")


accepted = AcceptedCount()


@events.test_start.add_listener
def reset_count(environment, **kwargs) -> None:
    """Start each test from zero (the web UI can run several tests in one process)."""
    accepted.events = 0


@events.test_stop.add_listener
def report_count(environment, **kwargs) -> None:
    """Report the events accepted once every user of this process has stopped."""
    accepted.report(environment)


def timestamp() -> str:
    """Return now in one of the accepted forms: Z, a ±hh:mm offset, or none (read as UTC)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    form = random.random()
    if form < 0.6:
        return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if form < 0.9:
        offset = datetime.timezone(random.choice(OFFSETS))
        return now.astimezone(offset).isoformat(timespec="microseconds")
    return now.replace(tzinfo=None).isoformat(timespec="seconds")


def user_id() -> int:
    """Return a user id: a few hot users send much, a long tail sends little."""
    if random.random() < HOT_USER_SHARE:
        return random.randint(1, HOT_USERS)
    return random.randint(HOT_USERS + 1, HOT_USERS + COLD_USERS)


def metadata() -> dict:
    """Return nested, partly unicode metadata as a web or mobile client would send."""
    n = random.randint(1, 5000)
    items = [{"sku": f"SKU-{random.randint(1, 99999):05d}", "qty": random.randint(1, 3),
              "price": round(random.uniform(1, 300), 2)}
             for _ in range(random.choice((0, 0, 1, 2, 4)))]
    return {
        "type": random.choice(EVENT_TYPES),
        "page": random.choice(PAGES).format(n=n),
        "referrer": random.choice(REFERRERS).format(n=n),
        "device": dict(random.choice(DEVICES), screen={"w": 390, "h": 844}),
        "utm": random.choice(UTM),
        "items": items,
        "text": random.choice(TEXTS),
        "session": {"id": uuid.uuid4().hex[:16], "seq": random.randint(1, 200)},
        "consent": random.random() < 0.8,
        "scroll_depth": None if random.random() < 0.5 else round(random.random(), 3),
    }


def good_event() -> dict:
    """Return a valid event with a client-chosen event_id."""
    return {"event_id": str(uuid.uuid4()), "user_id": user_id(), "timestamp": timestamp(),
            "metadata": metadata()}


def bad_event() -> dict:
    """Return an event the contract refuses: a wrong type or an unknown field."""
    event = good_event()
    fault = random.choice(("user_id_string", "user_id_negative", "unknown_field",
                           "metadata_list", "bad_timestamp"))
    if fault == "user_id_string":
        event["user_id"] = str(event["user_id"])
    elif fault == "user_id_negative":
        event["user_id"] = -1
    elif fault == "unknown_field":
        event["userId"] = event.pop("user_id")  # the typo the contract exists to catch
    elif fault == "metadata_list":
        event["metadata"] = [event["metadata"]]
    else:
        event["timestamp"] = "yesterday at noon"
    return event


def encode(document) -> bytes:
    """Encode as UTF-8 JSON, raw unicode half of the time and \\u escapes the other half."""
    return json.dumps(document, ensure_ascii=random.random() < 0.5,
                      separators=(",", ":")).encode()


class DeviceUser(FastHttpUser):
    """One client device sending clickstream events to the collector."""

    host = "http://127.0.0.1:8000"

    def wait_time(self) -> float:
        """Pause like a person between clicks (--think-time, default about a second)."""
        mean = self.environment.parsed_options.think_time if self.environment.parsed_options \
            else DEFAULT_THINK_TIME
        return random.uniform(mean * (1 - THINK_JITTER), mean * (1 + THINK_JITTER))

    @task(50)
    def send_event(self) -> None:
        """POST one event; about 1% are invalid on purpose and must be refused with 400."""
        if random.random() < BAD_EVENT_SHARE:
            self._send_bad_event()
            return
        with self.client.post("/event", data=encode(good_event()), headers=JSON_HEADERS,
                              name="/event", catch_response=True) as response:
            if response.status_code == 202:
                accepted.add(1)
            else:
                response.failure(f"expected 202, got {response.status_code}: "
                                 f"{(response.text or '')[:200]}")

    @task(1)
    def send_batch(self) -> None:
        """POST a batch of 20-100 events as a JSON array, as an app flushing its buffer does."""
        batch = [good_event() for _ in range(random.randint(BATCH_MIN, BATCH_MAX))]
        with self.client.post("/events", data=encode(batch), headers=JSON_HEADERS,
                              name="/events", catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"expected 202, got {response.status_code}: "
                                 f"{(response.text or '')[:200]}")
                return
            body = response.json()
            accepted.add(len(body.get("accepted", ())))
            if body.get("refused"):
                response.failure(f"{len(body['refused'])} valid events refused: "
                                 f"{body['refused'][0]}")

    def _send_bad_event(self) -> None:
        with self.client.post("/event", data=encode(bad_event()), headers=JSON_HEADERS,
                              name="/event (invalid, expect 400)",
                              catch_response=True) as response:
            if response.status_code == 400:
                response.success()
            else:
                if response.status_code == 202:
                    accepted.add(1)  # wrongly accepted, but it will be stored: count it
                response.failure(f"invalid event answered {response.status_code}, not 400")
