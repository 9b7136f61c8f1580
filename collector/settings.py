"""The collector's settings: one table of environment variables, parsed once at start.

Each entry names its variable, its type, its default, what it is for and the rule it
must follow. `Settings.from_environ()` checks every value and raises `SettingsError`
naming the variable, the value and the rule, so a bad deployment fails at start:

    COLLECTOR_BATCH_SIZE='ten': expected an integer >= 1
"""

import dataclasses
import os
import re
import urllib.parse
from typing import Any, Mapping

FSYNC_POLICIES = ("never", "interval", "always")
PARTITION_INTERVALS = ("month", "day")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "plain")
INSERT_METHODS = ("execute_values", "json_recordset")  # storage/writer.py's two forms


class SettingsError(ValueError):
    """A setting's value breaks its rule."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configurable value: where it comes from and what it may be."""

    field: str
    env: str
    kind: str  # "int", "float", "str", "choice", "list"
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[str, ...] = ()
    item: tuple[str, str] | None = None  # a list item's (regular expression, rule)


SETTINGS = (
    Setting("database_url", "DATABASE_URL", "str", None,
            "libpq URI of the PostgreSQL that stores the events (required by gunicorn; "
            "`make run` starts a project-local one when unset)"),
    Setting("read_database_url", "COLLECTOR_READ_DATABASE_URL", "str", "",
            "libpq URI that GET /events and /counts read from, e.g. a streaming standby "
            "(it may lag behind: a stored event can be missing for a moment); empty: "
            "DATABASE_URL"),
    Setting("batch_size", "COLLECTOR_BATCH_SIZE", "int", 1000,
            "most events the flusher writes in one INSERT", minimum=1),
    Setting("flush_interval", "COLLECTOR_FLUSH_INTERVAL", "float", 0.2,
            "seconds the flusher waits for a batch to fill before writing what it has",
            minimum=0.001),
    Setting("insert_method", "COLLECTOR_INSERT_METHOD", "choice", "json_recordset",
            "form of the batch INSERT: execute_values (a VALUES row per event) or "
            "json_recordset (the batch as one JSON parameter)", choices=INSERT_METHODS),
    Setting("queue_capacity", "COLLECTOR_QUEUE_CAPACITY", "int", 50_000,
            "events held in memory per worker; past it events wait in the spool only",
            minimum=1),
    Setting("max_event_bytes", "COLLECTOR_MAX_EVENT_BYTES", "int", 65_536,
            "largest body of POST /event, in bytes (after gzip decompression)", minimum=64),
    Setting("max_batch_bytes", "COLLECTOR_MAX_BATCH_BYTES", "int", 5_242_880,
            "largest body of POST /events, in bytes (after gzip decompression)", minimum=64),
    Setting("max_batch_events", "COLLECTOR_MAX_BATCH_EVENTS", "int", 5_000,
            "most events in one POST /events", minimum=1),
    Setting("max_metadata_depth", "COLLECTOR_MAX_METADATA_DEPTH", "int", 32,
            "deepest nesting of objects and arrays allowed in metadata", minimum=1),
    Setting("spool_dir", "COLLECTOR_SPOOL_DIR", "str", "var/spool",
            "directory of the crash-safe spool; each worker writes its own subdirectory"),
    Setting("spool_fsync", "COLLECTOR_SPOOL_FSYNC", "choice", "interval",
            "when the spool is fsynced: never (survives a process crash), interval "
            "(also a power loss, but for the last COLLECTOR_SPOOL_FSYNC_INTERVAL), "
            "always (before every 202)", choices=FSYNC_POLICIES),
    Setting("spool_fsync_interval", "COLLECTOR_SPOOL_FSYNC_INTERVAL", "float", 1.0,
            "seconds between fsyncs of the spool with COLLECTOR_SPOOL_FSYNC=interval",
            minimum=0.001),
    Setting("spool_max_bytes", "COLLECTOR_SPOOL_MAX_BYTES", "int", 1_073_741_824,
            "disk budget of each worker's spool; past it POST answers 503", minimum=4096),
    Setting("spool_segment_bytes", "COLLECTOR_SPOOL_SEGMENT_BYTES", "int", 16_777_216,
            "size at which a spool segment is closed and a new one begun", minimum=4096),
    Setting("statement_timeout", "COLLECTOR_STATEMENT_TIMEOUT", "float", 10.0,
            "seconds PostgreSQL may spend on one INSERT before it is cancelled and retried",
            minimum=0.1),
    Setting("lock_timeout", "COLLECTOR_LOCK_TIMEOUT", "float", 2.0,
            "seconds an INSERT may wait for a table lock before it is retried", minimum=0.1),
    Setting("connect_timeout", "COLLECTOR_CONNECT_TIMEOUT", "float", 5.0,
            "seconds a connection attempt to PostgreSQL may take", minimum=0.1),
    Setting("retry_max_delay", "COLLECTOR_RETRY_MAX_DELAY", "float", 5.0,
            "ceiling of the backoff between retries while PostgreSQL is unavailable",
            minimum=0.01),
    Setting("read_timeout", "COLLECTOR_READ_TIMEOUT", "float", 5.0,
            "seconds PostgreSQL may spend on one GET /events or /counts query before it is "
            "cancelled (503)", minimum=0.1),
    Setting("read_pool_size", "COLLECTOR_READ_POOL_SIZE", "int", 4,
            "read connections per worker, apart from the flusher's; more reads at once wait",
            minimum=1),
    Setting("rollup_keys", "COLLECTOR_ROLLUP_KEYS", "list", "",
            "comma-separated metadata keys whose values GET /counts can count by "
            "(counted from when first configured)"),
    Setting("metadata_index", "COLLECTOR_METADATA_INDEX", "choice", "on",
            "on: GET /events?metadata= is served by a GIN index; off: no such index "
            "(cheaper INSERTs), and metadata filters scan the partitions",
            choices=("on", "off")),
    Setting("partition_interval", "COLLECTOR_PARTITION_INTERVAL", "choice", "month",
            "range of one partition of events: month, or day for high volumes and "
            "retention to the day", choices=PARTITION_INTERVALS),
    Setting("retention_days", "COLLECTOR_RETENTION_DAYS", "int", 0,
            "drop partitions of events whose whole range is older than this many days; "
            "0 keeps everything", minimum=0),
    Setting("log_level", "COLLECTOR_LOG_LEVEL", "choice", "info",
            "level of the application log", choices=LOG_LEVELS),
    Setting("log_format", "COLLECTOR_LOG_FORMAT", "choice", "auto",
            "json (one JSON object a line), plain (a line for people), or auto: plain on "
            "a terminal, json otherwise", choices=LOG_FORMATS),
    Setting("cors_origins", "COLLECTOR_CORS_ORIGINS", "list", "",
            "comma-separated origins whose browser pages may POST events (CORS), or `*` "
            "for any; empty: CORS off",
            item=(r"\*|https?://[^/\s]+", "`*` or origins like https://shop.example.com "
                                          "(scheme and host, no path)")),
    Setting("read_keys", "COLLECTOR_READ_KEYS", "list", "",
            "comma-separated secret read keys, distinct from the write keys; when set, "
            "GET /events and /counts need one, in the same headers as COLLECTOR_API_KEYS; "
            "empty: reads are open to whoever reaches the port",
            item=(r"[!-~]+", "keys of printable ASCII characters")),
    Setting("api_keys", "COLLECTOR_API_KEYS", "list", "",
            "comma-separated write keys; when set, POST /event and /events need one in "
            "X-API-Key, `Authorization: Bearer KEY` or `Authorization: Basic` (key as "
            "user name); empty: no key needed",
            item=(r"[!-~]+", "keys of printable ASCII characters")),
)

SECRET_FIELDS = ("api_keys", "read_keys")  # shown as *** in repr and logs
URL_FIELDS = ("database_url", "read_database_url")  # shown with the password as ***


def _default(setting: Setting) -> Any:
    """Return a setting's default as the type it is parsed to."""
    return _parse(setting, setting.default) if setting.kind == "list" else setting.default


def _parse(setting: Setting, raw: str) -> Any:
    """Turn one raw environment value into its typed value, or raise SettingsError."""
    def fail(rule: str) -> SettingsError:
        shown = "'***'" if setting.field in SECRET_FIELDS else repr(raw)
        return SettingsError(f"{setting.env}={shown}: expected {rule}")

    if setting.kind == "int":
        # int() accepts "1_000" and " 7 "; a setting should be plain digits.
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise fail(f"an integer >= {setting.minimum:g}")
        value: Any = int(raw)
    elif setting.kind == "float":
        try:
            value = float(raw)
        except ValueError:
            raise fail(f"a number >= {setting.minimum:g}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise fail(f"a number >= {setting.minimum:g}")
    elif setting.kind == "choice":
        value = raw.strip().lower()
        if value not in setting.choices:
            raise fail("one of " + ", ".join(setting.choices))
        return value
    elif setting.kind == "list":
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if setting.item is not None:
            pattern, rule = setting.item
            if not all(re.fullmatch(pattern, item) for item in items):
                raise fail(rule)
        return items
    else:
        return raw
    if setting.minimum is not None and value < setting.minimum:
        noun = "an integer" if setting.kind == "int" else "a number"
        raise fail(f"{noun} >= {setting.minimum:g}")
    return value


_DEFAULTS = {setting.field: _default(setting) for setting in SETTINGS}


def _redact(url: str | None) -> str | None:
    """Return the URL with its password replaced by ***."""
    if not url:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@dataclasses.dataclass(frozen=True, repr=False)
class Settings:
    """Every setting of the collector, checked; build with `from_environ` or by hand in tests."""

    database_url: str | None = _DEFAULTS["database_url"]
    read_database_url: str = _DEFAULTS["read_database_url"]
    batch_size: int = _DEFAULTS["batch_size"]
    flush_interval: float = _DEFAULTS["flush_interval"]
    insert_method: str = _DEFAULTS["insert_method"]
    queue_capacity: int = _DEFAULTS["queue_capacity"]
    max_event_bytes: int = _DEFAULTS["max_event_bytes"]
    max_batch_bytes: int = _DEFAULTS["max_batch_bytes"]
    max_batch_events: int = _DEFAULTS["max_batch_events"]
    max_metadata_depth: int = _DEFAULTS["max_metadata_depth"]
    spool_dir: str = _DEFAULTS["spool_dir"]
    spool_fsync: str = _DEFAULTS["spool_fsync"]
    spool_fsync_interval: float = _DEFAULTS["spool_fsync_interval"]
    spool_max_bytes: int = _DEFAULTS["spool_max_bytes"]
    spool_segment_bytes: int = _DEFAULTS["spool_segment_bytes"]
    statement_timeout: float = _DEFAULTS["statement_timeout"]
    lock_timeout: float = _DEFAULTS["lock_timeout"]
    connect_timeout: float = _DEFAULTS["connect_timeout"]
    retry_max_delay: float = _DEFAULTS["retry_max_delay"]
    read_timeout: float = _DEFAULTS["read_timeout"]
    read_pool_size: int = _DEFAULTS["read_pool_size"]
    rollup_keys: tuple[str, ...] = _DEFAULTS["rollup_keys"]
    metadata_index: str = _DEFAULTS["metadata_index"]
    partition_interval: str = _DEFAULTS["partition_interval"]
    retention_days: int = _DEFAULTS["retention_days"]
    log_level: str = _DEFAULTS["log_level"]
    log_format: str = _DEFAULTS["log_format"]
    cors_origins: tuple[str, ...] = _DEFAULTS["cors_origins"]
    read_keys: tuple[str, ...] = _DEFAULTS["read_keys"]
    api_keys: tuple[str, ...] = _DEFAULTS["api_keys"]

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ,
                     require_database: bool = True) -> "Settings":
        """Read and check every setting; raise SettingsError naming the first bad one."""
        values = {}
        for setting in SETTINGS:
            raw = environ.get(setting.env)
            if raw is None or raw == "":
                if setting.field == "database_url" and require_database:
                    raise SettingsError(f"{setting.env} is not set: {setting.help}")
                continue
            values[setting.field] = _parse(setting, raw)
        if set(values.get("read_keys", ())) & set(values.get("api_keys", ())):
            # A write key ships in pages and apps: as a read key it would open every event.
            raise SettingsError("COLLECTOR_READ_KEYS='***': expected keys that are not "
                                "also write keys (COLLECTOR_API_KEYS)")
        return cls(**values)

    @property
    def wants_metadata_index(self) -> bool:
        """Tell whether COLLECTOR_METADATA_INDEX asks for the metadata index."""
        return self.metadata_index == "on"

    def __repr__(self) -> str:
        shown = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in URL_FIELDS:
                value = _redact(value)
            elif field.name in SECRET_FIELDS:
                value = tuple("***" for _ in value)
            shown.append(f"{field.name}={value!r}")
        return "Settings(" + ", ".join(shown) + ")"
