# detforge: `make demo` and `make test` work on a fresh clone (they create .venv and install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/detforge run configs/demo.yaml --out runs/demo --resume

# pytest-xdist workers: one per CPU this process may use, at most 8 (each holds torch and its models in
# memory); each gets its share of the threads (tests/conftest.py); a test file stays on one worker, so its
# module fixtures are built once. `make test TEST_WORKERS=0` runs it without workers.
TEST_WORKERS ?= $(shell $(BIN)/python -c "from latency_tables.host import usable_cores; print(min(8, usable_cores()))")

test: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/pip install -q -e '.[dev,postgres]'   # the PostgreSQL driver, so the marked test runs (docs/cluster.md)
	$(BIN)/pytest -q -m "slow or postgres"
	$(BIN)/python benchmarks/run_all.py

lint: install
	$(BIN)/ruff check search_spaces trainer latency_tables compress nas benchmarks tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
