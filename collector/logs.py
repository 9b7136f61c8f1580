"""gunicorn's logger for Firehose: builds access log lines only when the access log is on.

With `logconfig_dict` set, gunicorn builds every access log record even when no
handler writes it; at thousands of requests a second that was ~8% of a worker's
CPU (py-spy). This module imports nothing of the project, so gunicorn's master
may load it before gevent patches anything (docs/gevent-and-psycopg2.md).
"""

from gunicorn import glogging


class GunicornLogger(glogging.Logger):
    """gunicorn's Logger, with the access log governed by the `accesslog` setting alone."""

    def _compute_access_log_enabled(self) -> bool:
        return bool(self.cfg.accesslog)
