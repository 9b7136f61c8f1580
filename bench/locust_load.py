"""Run locustfile.py headless and read what locust could drive, from its CSV statistics."""

import csv
import dataclasses
import os
import pathlib

from bench.processes import BenchError, run_bounded

USERS = 200
SPAWN_RATE = 100  # users started per second
STOP_TIMEOUT = 10  # seconds users get to finish their request at the end, so each 202 is counted
RUN_MARGIN = 90.0  # seconds past the test duration before locust is killed
EXIT_FAILURES = 1  # locust's exit code when some requests failed: reported, not fatal


@dataclasses.dataclass
class LocustResult:
    """What one locust run reported."""

    requests: int
    failures: int
    rate: float  # requests per second (single events, batches and invalid events)
    p50_ms: float
    p99_ms: float
    accepted: int  # events answered 202, summed over locust's processes
    seconds: float
    output: str


def _number(value: str) -> float:
    return float(value) if value not in ("", "N/A") else float("nan")


def run_locust(project: pathlib.Path, url: str, processes: int, seconds: float,
               directory: pathlib.Path, log_path: pathlib.Path) -> LocustResult:
    """Run locust with no think time against url; return its aggregate figures."""
    directory.mkdir(parents=True, exist_ok=True)
    accepted_file = directory / "accepted"
    command = [str(project / ".venv" / "bin" / "locust"), "-f", "locustfile.py", "--headless",
               "-u", str(USERS), "-r", str(SPAWN_RATE), "-t", f"{round(seconds)}s",
               "--host", url, "--stop-timeout", str(STOP_TIMEOUT), "--only-summary",
               "--csv", str(directory / "locust"),
               # No think time: measure how many requests per second locust can drive.
               "--think-time", "0", "--accepted-file", str(accepted_file)]
    if processes > 1:
        command += ["--processes", str(processes)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    output = run_bounded("locust", command, seconds + RUN_MARGIN, log_path, env, project,
                         ok_codes=(0, EXIT_FAILURES))
    with open(directory / "locust_stats.csv", newline="") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    total = rows.get("Aggregated")
    if total is None:
        raise BenchError(f"locust wrote no aggregate statistics:\n{output[-2000:]}")
    counts = list(directory.glob("accepted*"))
    if len(counts) != processes:
        raise BenchError(f"expected {processes} accepted-event counts from locust, found "
                         f"{len(counts)}:\n{output[-2000:]}")
    requests = int(total["Request Count"])
    rate = _number(total["Requests/s"])
    return LocustResult(
        requests=requests,
        failures=int(total["Failure Count"]),
        rate=rate,
        p50_ms=_number(total["50%"]),
        p99_ms=_number(total["99%"]),
        accepted=sum(int(path.read_text()) for path in counts),
        seconds=seconds,
        output=output,
    )
