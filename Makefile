# Firehose: `make run` starts the service, `make test` runs every test.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench chaos clean

# Start PostgreSQL (project-local unless DATABASE_URL is set) and gunicorn.
run: $(STAMP)
	@scripts/run.sh

# Run the whole test suite against a real PostgreSQL, gunicorn and nginx.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Run the benchmark scenarios and print the table of figures.
bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

# Load the service while faults come at random (CHAOS_ARGS='--duration 1800 --seed 7').
chaos: $(STAMP)
	$(PY) -m tests.chaos $(CHAOS_ARGS)

# Stop the project-local PostgreSQL and remove the virtualenv and var/.
clean:
	-[ -x $(PY) ] && $(PY) -m storage.localdb stop
	rm -rf $(VENV) var

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)
