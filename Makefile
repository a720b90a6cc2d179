# pitchey-ws: `make run` starts the demo daemon, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# One stamp per set of requirements: `make run` installs the runtime only, `make test` the
# runtime, the optional engines and the dev tools. The dev install includes the runtime, so it
# refreshes the runtime stamp too and `make run` after `make test` installs nothing.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: run test lint typecheck unit bench clean client

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): requirements.txt | $(BIN)/python
	$(PIP) -r requirements.txt
	touch $(RUN_STAMP)

$(DEV_STAMP): requirements.txt requirements-engines.txt requirements-crypto.txt requirements-dev.txt \
		| $(BIN)/python
	$(PIP) -r requirements-dev.txt
	touch $(DEV_STAMP) $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/python pitchey_ws.py serve --demo --port $(PORT)

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# The JS package's dev tools (esbuild, React for the browser tests), from the lockfile.
client/node_modules/.package-lock.json: client/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: the React tests will be skipped"; exit 0; }; \
	cd client && npm ci --no-audit --no-fund

client: client/node_modules/.package-lock.json

unit: $(DEV_STAMP) client
	$(BIN)/python -m pytest

test: lint typecheck unit

# The Node reference relay's `ws` package, from the lockfile; without npm that target is skipped.
bench/node_modules/.package-lock.json: bench/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: the Node reference relay (relay-node) will be skipped"; exit 0; }; \
	cd bench && npm ci --no-audit --no-fund

# Not part of `make test`: ~10-13 minutes, loads both cores. BENCH_ARGS=--quick for a smoke run;
# then bench/scale.py (databases of 10k, 100k and 1M messages, ~2 minutes; SCALE_ARGS=--sizes ...)
# and bench/ceiling.py (16,000 idle connections under a descriptor limit, ~40 s).
bench: $(DEV_STAMP) bench/node_modules/.package-lock.json
	$(PIP) -r bench/requirements.txt
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/scale.py $(SCALE_ARGS)
	$(BIN)/python bench/ceiling.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache client/node_modules bench/node_modules
