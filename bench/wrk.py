"""Run wrk with bench/events.lua and read its report: rate, latency, errors, statuses."""

import dataclasses
import pathlib
import re

from bench.processes import BenchError, run_bounded

THREADS = 2  # wrk threads: one per core of the 2-core machine this was written for
# A request not answered within this many seconds counts as a timeout error (wrk's default).
REQUEST_TIMEOUT = "2s"
RUN_MARGIN = 30.0  # seconds past the test duration before wrk is killed
SCRIPT = pathlib.Path(__file__).resolve().with_name("events.lua")
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclasses.dataclass
class WrkResult:
    """What one wrk run reported."""

    requests: int
    seconds: float
    rate: float  # requests per second
    p50_ms: float
    p99_ms: float
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non_2xx: int
    statuses: dict[int, int]  # responses by HTTP status (from the Lua script)
    output: str

    @property
    def errors(self) -> int:
        """Return the number of socket errors of every kind."""
        return sum(self.socket_errors.values())

    @property
    def accepted(self) -> int:
        """Return the number of responses with status 202."""
        return self.statuses.get(202, 0)


def _ms(value: str, unit: str) -> float:
    return float(value) * UNITS_MS[unit]


def parse_output(text: str) -> WrkResult:
    """Read wrk's --latency report and the script's statuses line; raise BenchError if absent."""
    summary = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)", text, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)", text, re.MULTILINE)
    if not (summary and rate):
        raise BenchError(f"cannot read wrk's report:\n{text[-2000:]}")
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    if socket:
        errors = dict(zip(errors, map(int, socket.groups())))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    statuses_line = re.search(r"^statuses:(.*)$", text, re.MULTILINE)
    statuses = {}
    if statuses_line:
        statuses = {int(k): int(v) for k, v in re.findall(r"(\d+)=(\d+)", statuses_line.group(1))}
    return WrkResult(
        requests=int(summary.group(1)),
        seconds=_ms(summary.group(2), summary.group(3)) / 1000,
        rate=float(rate.group(1)),
        # No latency lines when no request completed at all.
        p50_ms=_ms(*p50.groups()) if p50 else float("nan"),
        p99_ms=_ms(*p99.groups()) if p99 else float("nan"),
        socket_errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        statuses=statuses,
        output=text,
    )


def run_wrk(wrk: str, url: str, connections: int, seconds: float, events_per_request: int,
            log_path: pathlib.Path) -> WrkResult:
    """Load url for `seconds` with POSTs of unique events; return what wrk measured."""
    command = [wrk, f"-t{THREADS}", f"-c{connections}", f"-d{round(seconds)}s", "--latency",
               "--timeout", REQUEST_TIMEOUT, "-s", str(SCRIPT), url, "--",
               str(events_per_request)]
    output = run_bounded("wrk", command, seconds + RUN_MARGIN, log_path)
    return parse_output(output)
