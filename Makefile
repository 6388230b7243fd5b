# The two set-up commands of the README: `make up` and `make test`. Both install what they need
# first (scripts/bootstrap.sh is idempotent: a second run installs nothing).
VENV ?= .venv
BIN := $(VENV)/bin
NODES ?= 2
STATE_DIR ?= $(HOME)/.local/state/ciliate
PYTEST_ARGS ?=

.PHONY: setup up test lint typecheck layers unit integration privileged conformance bench clean

setup:
	@bash scripts/bootstrap.sh

up: setup
	$(BIN)/ciliate up --nodes $(NODES) --state-dir $(STATE_DIR) --example examples/starwars.yaml

lint:
	$(BIN)/ruff check .

typecheck:
	$(BIN)/mypy ciliate services bench

layers:
	$(BIN)/lint-imports

test: setup lint typecheck layers
	$(BIN)/pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

privileged: setup
	$(BIN)/pytest -m privileged $(PYTEST_ARGS)

conformance: setup
	$(BIN)/pytest tests/conformance $(PYTEST_ARGS)

bench: setup
	@for b in bench/*/run.py; do n=$$(basename $$(dirname $$b)); echo "== bench.$$n"; \
		$(BIN)/python -m bench.$$n.run || exit 1; done

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache
