"""The benchmark's report: the machine, one aligned table of medians over the runs, then
Firehose's figures as ratios of the peer's, from the same run."""

import datetime
import math
import os
import platform
import statistics
import subprocess

from bench.measure import Measurement

REFERENCE = "nginx-202"
COLUMNS = ("scenario", "conns", "req/s", "p50 ms", "p99 ms", "errors", "non-2xx",
           "committed/s", "drain s", "RSS MB", "vs nginx")
FOOTNOTES = """\
req/s, p50, p99, committed/s: median of the runs (± half the spread between the fastest and
  slowest run, as a share of the median); errors, non-2xx, drain s, RSS MB: the worst run.
errors: wrk's socket errors (connect, read, write, timeout > {timeout}) or locust's failures.
committed/s: rows in events (peer-*: in peer_events) / (load time + drain time); drain s:
  from the end of the load until no worker holds an unflushed event (/health "pending")
  and the rows equal the events the workers accepted (/health "accepted"); the rows are
  counted once, at the end.
RSS MB: the largest gunicorn (peer-*: uvicorn) worker's VmRSS at the end of the run.
vs nginx: events answered 202 per second / nginx-202's requests per second (a batch of
  {batch} events counts {batch}); locust rows: users instead of connections.
peer-*: the same load sent to bench/peers/fastapi_peer.py, a conventional collector
  (FastAPI, uvicorn, asyncpg COPY, no spool) with as many workers as Firehose."""
PEER_HEADING = ("Firehose / peer, same run (medians; above 1 is better for req/s and "
                "committed/s, below 1 for p99):")


def machine() -> list[str]:
    """Describe the machine and the moment: cores, CPU model, memory, kernel, date."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            total_kb = int(meminfo.readline().split()[1])
    except OSError:
        total_kb = 0
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return [f"machine: {os.cpu_count()} cores (nproc), {model}, "
            f"{total_kb / 1024 / 1024:.1f} GiB RAM, Linux {platform.release()}",
            f"date: {now.isoformat().replace('+00:00', 'Z')}"]


def program_version(command: list[str]) -> str:
    """Return the first line a program prints about its version ('?' if it cannot be run)."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return lines[0].split(" Copyright")[0] if lines else "?"  # wrk adds its copyright


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _spread(values: list[float]) -> str:
    """Return '±N%': half the range of the runs relative to their median ('' for one run)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if len(values) < 2:
        return ""
    middle = statistics.median(values)
    if not middle:
        return ""
    return f" ±{(max(values) - min(values)) / 2 / middle * 100:.0f}%"


def _rate(values: list[float | None]) -> str:
    if all(v is None for v in values):
        return "-"
    middle = _median(values)
    return "-" if math.isnan(middle) else f"{middle:,.0f}{_spread(values)}"


def _ms(values: list[float]) -> str:
    middle = _median(values)
    if math.isnan(middle):
        return "-"
    return f"{middle:.1f}" if middle < 100 else f"{middle:,.0f}"


def _worst(values: list[float | None], digits: int = 0, missing: str = "-") -> str:
    if not values or all(v is None for v in values):
        return missing
    if any(v is None for v in values):
        return "not drained"  # only drain s can be None while others are set
    return f"{max(values):,.{digits}f}"


def table_rows(results: dict[str, list[Measurement]]) -> list[tuple[str, ...]]:
    """Turn each scenario's runs into one row of COLUMNS."""
    reference = _median([m.rate for m in results.get(REFERENCE, [])])
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        scenario = runs[0].scenario
        collector = scenario.reaches_collector
        ratio = _median([m.events_rate for m in runs]) / reference \
            if reference and not math.isnan(reference) else float("nan")
        rows.append((
            name,
            str(scenario.connections),
            _rate([m.rate for m in runs]),
            _ms([m.p50_ms for m in runs]),
            _ms([m.p99_ms for m in runs]),
            f"{max(m.errors for m in runs):,}",
            f"{max(m.non_2xx for m in runs):,}",
            _rate([m.committed_rate for m in runs]) if collector else "-",
            _worst([m.drain_s for m in runs], 1) if collector else "-",
            _worst([m.rss_mb for m in runs], 0) if collector else "-",
            "-" if math.isnan(ratio) else f"{ratio:.2f}",
        ))
    return rows


def _ratio(label: str, ours: list[float | None], peer: list[float | None]) -> str:
    """Return e.g. 'req/s 3,327 / 4,580 = 0.73' (Firehose's median, the peer's, their ratio)."""
    mine, theirs = _median(ours), _median(peer)
    if math.isnan(mine) or math.isnan(theirs) or not theirs:
        return f"{label} -"
    shown = [f"{v:.1f}" if v < 100 else f"{v:,.0f}" for v in (mine, theirs)]
    return f"{label} {shown[0]} / {shown[1]} = {mine / theirs:.2f}"


def peer_ratios(results: dict[str, list[Measurement]]) -> list[str]:
    """Return a line per peer scenario run beside its Firehose one: each figure as a ratio."""
    lines = []
    for name, runs in results.items():
        if not runs or not runs[0].scenario.peer_of:
            continue
        theirs_name = runs[0].scenario.peer_of
        ours = results.get(theirs_name)
        if not ours:
            continue
        lines.append(f"  {theirs_name} / {name}: " + "; ".join([
            _ratio("req/s", [m.rate for m in ours], [m.rate for m in runs]),
            _ratio("p99 ms", [m.p99_ms for m in ours], [m.p99_ms for m in runs]),
            _ratio("committed/s", [m.committed_rate for m in ours],
                   [m.committed_rate for m in runs]),
        ]))
    return lines


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Align rows under COLUMNS: text to the left, figures to the right."""
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = []
    for row in [COLUMNS, *rows]:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width)
                                             for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def notes(results: dict[str, list[Measurement]]) -> list[str]:
    """Return every run's notes, each naming its scenario and run."""
    lines = []
    for name, runs in results.items():
        for index, measurement in enumerate(runs, 1):
            check = ""
            if measurement.rows is not None:
                check = (f"rows {measurement.rows:,} / accepted {measurement.accepted:,} "
                         f"(client saw {measurement.client_accepted:,} × 202)")
            for note in ([check] if check else []) + measurement.notes:
                lines.append(f"  {name} run {index}: {note}")
    return lines
