"""gunicorn settings for Firehose: `gunicorn -c gunicorn.conf.py` with DATABASE_URL set.

Keep this file free of project imports: it is read by the master before gevent's
monkey-patching, and anything it imports would be imported unpatched (docs/gevent-and-psycopg2.md).
The hooks reach the app gunicorn loaded in the worker; the only project module the
master imports is collector.settings (standard library only), to check the start.
"""

import errno
import glob
import os
import shutil
import sys
import tempfile

# --- The application --------------------------------------------------------
wsgi_app = "collector.app:get_app()"
# No preload: the app (and its PostgreSQL connection) is built in each worker,
# after the fork and after gevent's patch_all (docs/gevent-and-psycopg2.md).
preload_app = False

# --- Binding ----------------------------------------------------------------
# `--bind` on the command line wins; otherwise PORT (as on most PaaS), else 8000.
bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"]
backlog = 4096
# Each worker binds its own socket and the kernel spreads new connections evenly,
# instead of the busiest worker winning accept() races.
reuse_port = True

# --- Workers ----------------------------------------------------------------
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
# gunicorn's gevent worker with connections taking turns, many accepts per loop turn
# and one write per response (collector/worker.py).
worker_class = "collector.worker.FirehoseWorker"
worker_connections = 4000  # concurrent connections per worker
# A worker whose main loop is blocked this long is killed; the spool keeps its events.
timeout = 30

# --- Keep-alive and shutdown -------------------------------------------------
# Longer than nginx's upstream keepalive_timeout (10 s in conf/nginx.conf), so that
# nginx, not gunicorn, closes idle connections and no POST meets a closed one.
keepalive = 15
# SIGTERM: stop accepting, finish requests, flush the queue to PostgreSQL; after this
# many seconds the master kills the worker and its spool is replayed by the next.
graceful_timeout = 30

# --- Logging ----------------------------------------------------------------
# gunicorn owns the handlers; the app's loggers (collector.*, storage.*) and gunicorn's
# own write JSON lines to stderr: {"level", "logger", "pid", "message", "time"} (plus
# "exc_info" with a traceback), or plain lines for a person at a terminal
# (COLLECTOR_LOG_FORMAT). Nothing is logged per event at info.
# Access logs (ACCESS_LOG=1) go to stdout in Apache's combined format, except that
# the user field is always "-": a Basic auth user name is a write key here.
loglevel = os.environ.get("COLLECTOR_LOG_LEVEL", "info")
_level = loglevel.upper()
accesslog = "-" if os.environ.get("ACCESS_LOG") else None
logger_class = "collector.logs.GunicornLogger"
_format = os.environ.get("COLLECTOR_LOG_FORMAT", "auto").strip().lower()
if _format not in ("json", "plain"):  # auto (a bad value is refused by the app's settings)
    _format = "plain" if sys.stderr.isatty() else "json"
_access_handlers = ["access_stream"] if os.environ.get("ACCESS_LOG") else ["discard"]
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"level": "WARNING", "handlers": ["error_stream"]},
    "loggers": {
        "gunicorn.error": {"level": _level, "handlers": ["error_stream"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": _access_handlers, "propagate": False},
        "collector": {"level": _level, "handlers": ["error_stream"], "propagate": False},
        "storage": {"level": _level, "handlers": ["error_stream"], "propagate": False},
    },
    "handlers": {
        "error_stream": {"class": "logging.StreamHandler", "formatter": _format,
                         "stream": "ext://sys.stderr"},
        "access_stream": {"class": "logging.StreamHandler", "formatter": "access",
                          "stream": "ext://sys.stdout"},
        "discard": {"class": "logging.NullHandler"},
    },
    "formatters": {
        "json": {"()": "pythonjsonlogger.json.JsonFormatter",
                 "fmt": "%(levelname)s %(name)s %(process)d %(message)s",
                 "rename_fields": {"levelname": "level", "name": "logger", "process": "pid"},
                 "timestamp": "time"},  # ISO 8601, UTC, microseconds
        "plain": {"format": "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"},
        "access": {"format": "%(message)s"},
    },
}
# A control socket per user ($HOME/.gunicorn/gunicorn.ctl) would be shared by every
# instance on the machine (tests, benchmarks); Firehose does not use it.
control_socket_disable = True


# --- Metrics --------------------------------------------------------------------
# prometheus-client's multiprocess mode: each worker writes its metrics to files in
# PROMETHEUS_MULTIPROC_DIR, which must be set before a worker imports prometheus_client
# and be empty at each start. Unset, each run gets a directory of its own (on_starting).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_GIVEN = bool(os.environ.get(METRICS_DIR_ENV))

# gunicorn's APP_LOAD_ERROR, the exit status conf/firehose.service does not restart on.
APP_LOAD_ERROR = 4


# --- Hooks --------------------------------------------------------------------
def on_starting(server):
    """Check the settings and the spool directory, then give this run's metrics an empty
    directory, before any worker is forked."""
    check_start(server)
    if METRICS_DIR_GIVEN:
        os.makedirs(os.environ[METRICS_DIR_ENV], exist_ok=True)
        for path in glob.glob(os.path.join(os.environ[METRICS_DIR_ENV], "*.db")):
            os.remove(path)
    else:
        os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="firehose-metrics-")


def check_start(server):
    """Exit with APP_LOAD_ERROR and one line if the settings or the spool directory are bad."""
    # The workers check too (and exit with the same status), but when several booting
    # workers exit with it at once, gunicorn 27's master meets the second exit while
    # halting for the first (Arbiter.stop -> reap_workers raises HaltServer again) and
    # exits 1 with a traceback, which systemd would restart. So check once, here.
    from collector.settings import Settings, SettingsError
    try:
        spool_dir = Settings.from_environ().spool_dir
    except SettingsError as ex:
        print(f"firehose: configuration error: {ex}", file=sys.stderr)
        sys.exit(APP_LOAD_ERROR)
    try:
        os.makedirs(spool_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=spool_dir).close()
    except OSError as ex:
        if ex.errno in (errno.ENOSPC, errno.EDQUOT):
            return  # a full disk passes: the workers answer 503 until it has room
        server.log.error("spool directory %s cannot be written: %s; stopping with exit "
                         "status %d (not restarted by systemd)", os.path.abspath(spool_dir),
                         ex.strerror or ex, APP_LOAD_ERROR)
        sys.exit(APP_LOAD_ERROR)


def on_exit(server):
    """Remove the metrics directory this run made."""
    if not METRICS_DIR_GIVEN:
        shutil.rmtree(os.environ[METRICS_DIR_ENV], ignore_errors=True)


def child_exit(server, worker):
    """Drop a dead worker's gauges from /metrics; its counters still count."""
    # Imported here, in the master, only once a worker has exited. gunicorn has already
    # imported ssl and threading, and prometheus_client holds no lock across a greenlet
    # switch, so the copy later workers inherit is safe under gevent.
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)


def when_ready(server):
    """Say where the service listens: with reuse_port each worker binds its own socket,
    so gunicorn's own "Listening at" line has no address to show."""
    server.log.info("firehose listening at %s", ", ".join(f"http://{b}" for b in server.cfg.bind))


def post_worker_init(worker):
    """Start the worker's spool and flusher, after the fork and gevent's patching."""
    worker.wsgi.pipeline.start(lambda: worker.alive)


def worker_exit(server, worker):
    """Drain the worker's queue to PostgreSQL before gunicorn's graceful timeout ends."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.pipeline.stop(worker.cfg.graceful_timeout)
