# coleta — one command to run, one to test. Needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/coleta.toml

.PHONY: run test lint check-config clean venv bench

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "coleta needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

## run the daemon on the example config (embedded NATS and PostgreSQL unless NATS_URL / DATABASE_URL)
run: venv
	$(BIN)/coleta run --config $(CONFIG)

## run the whole test suite
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## the benchmark suite (~10 min; BENCH_ARGS="--quick" or "throughput latency" to narrow it)
bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

## ruff and mypy (strict) over the code
lint: venv
	$(BIN)/ruff check daemon contracts tests bench
	$(BIN)/ruff format --check daemon contracts tests bench
	$(BIN)/mypy

check-config: venv
	$(BIN)/coleta check-config $(CONFIG)

clean:
	rm -rf $(VENV) .coleta
