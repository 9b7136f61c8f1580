# Firehose: `make run` starts the service, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

# Start PostgreSQL (project-local unless DATABASE_URL is set) and gunicorn.
run: $(STAMP)
	@scripts/run.sh

# Run the whole test suite against a real PostgreSQL, gunicorn and nginx
# (PG=embedded or PG=system: which PostgreSQL the suite starts; see storage/localdb.py).
test: $(STAMP)
	$(if $(PG),FIREHOSE_PG=$(PG)) $(PY) -m pytest $(PYTEST_ARGS)

# Run the benchmark scenarios and print the table of figures.
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# Stop the project-local PostgreSQL, remove its data, the virtualenv (and the embedded server) and var/.
clean:
	-[ -x $(PY) ] && $(PY) -m storage.localdb remove
	rm -rf $(VENV) var *.egg-info

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)
