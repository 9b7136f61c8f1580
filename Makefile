# Firehose: `make run` starts the service, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime  # the service and its dependencies (pyproject.toml)
DEV := $(VENV)/.dev          # and the development tools: pytest, locust, schemathesis

.PHONY: install run test bench chaos clean

# Build the virtualenv with what the service needs to run, and nothing else.
install: $(RUNTIME)

# Start PostgreSQL (project-local unless DATABASE_URL is set) and gunicorn.
run: $(RUNTIME)
	@scripts/run.sh

# Run the whole test suite against a real PostgreSQL, gunicorn and nginx
# (PG=embedded or PG=system: which PostgreSQL the suite starts; see storage/localdb.py).
test: $(DEV)
	$(if $(PG),FIREHOSE_PG=$(PG)) $(PY) -m pytest $(PYTEST_ARGS)

# Run the benchmark scenarios and print the table of figures.
bench: $(DEV)
	$(PY) bench/run.py $(BENCH_ARGS)

# Load the service while faults come at random (CHAOS_ARGS='--duration 1800 --seed 7').
chaos: $(DEV)
	$(PY) -m tests.chaos $(CHAOS_ARGS)

# Stop the project-local PostgreSQL, remove its data, the virtualenv (and the embedded server) and var/.
clean:
	-[ -x $(PY) ] && $(PY) -m storage.localdb remove
	rm -rf $(VENV) var *.egg-info

$(RUNTIME): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(DEV)
