"""gunicorn settings for Firehose: `gunicorn -c gunicorn.conf.py` with DATABASE_URL set.

Keep this file free of project imports: it is read by the master before gevent's
monkey-patching, and anything it imports would be imported unpatched (pitfall 8).
The hooks import nothing; they reach the app gunicorn loaded in the worker.
"""

import os

# --- The application --------------------------------------------------------
wsgi_app = "collector.app:get_app()"
# No preload: the app (and its PostgreSQL connection) is built in each worker,
# after the fork and after gevent's patch_all (pitfalls 7 and 8).
preload_app = False

# --- Binding ----------------------------------------------------------------
# `--bind` on the command line wins; otherwise PORT (as on most PaaS), else 8000.
bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"]
backlog = 4096
# Each worker binds its own socket and the kernel spreads new connections evenly,
# instead of the busiest worker winning accept() races (pitfall 11).
reuse_port = True

# --- Workers ----------------------------------------------------------------
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_class = "gevent"
worker_connections = 4000  # concurrent connections per worker
# A worker whose main loop is blocked this long is killed; the spool keeps its events.
timeout = 30

# --- Keep-alive and shutdown -------------------------------------------------
# Longer than nginx's upstream keepalive_timeout (10 s in conf/nginx.conf), so that
# nginx, not gunicorn, closes idle connections and no POST meets a closed one (pitfall 9).
keepalive = 15
# SIGTERM: stop accepting, finish requests, flush the queue to PostgreSQL; after this
# many seconds the master kills the worker and its spool is replayed by the next.
graceful_timeout = 30

# --- Logging ----------------------------------------------------------------
# gunicorn owns the handlers; the app's loggers (collector.*, storage.*) share its
# error stream and format, which includes the pid. Access logs: set ACCESS_LOG=1.
loglevel = os.environ.get("COLLECTOR_LOG_LEVEL", "info")
_level = loglevel.upper()
accesslog = "-" if os.environ.get("ACCESS_LOG") else None
logger_class = "collector.logs.GunicornLogger"
_access_handlers = ["access_stream"] if os.environ.get("ACCESS_LOG") else ["discard"]
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
        "error_stream": {"class": "logging.StreamHandler", "formatter": "plain",
                         "stream": "ext://sys.stderr"},
        "access_stream": {"class": "logging.StreamHandler", "formatter": "plain",
                          "stream": "ext://sys.stdout"},
        "discard": {"class": "logging.NullHandler"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"},
    },
}
# A control socket per user ($HOME/.gunicorn/gunicorn.ctl) would be shared by every
# instance on the machine (tests, benchmarks); Firehose does not use it.
control_socket_disable = True


# --- Hooks --------------------------------------------------------------------
def post_worker_init(worker):
    """Start the worker's spool and flusher, after the fork and gevent's patching."""
    worker.wsgi.pipeline.start(lambda: worker.alive)


def worker_exit(server, worker):
    """Drain the worker's queue to PostgreSQL before gunicorn's graceful timeout ends."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.pipeline.stop(worker.cfg.graceful_timeout)
