# coleta — one command to run, one to test. Needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/coleta.toml

.PHONY: run test lint check-config clean venv bench prometheus-tools

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

## run the whole test suite (TEST_WORKERS processes side by side: the tests mostly wait on
## servers, so a few workers share two cores well; TEST_WORKERS=0 runs them in one process)
## Bytecode may be cached while testing even where PYTHONDONTWRITEBYTECODE is set: the suite
## starts hundreds of coleta processes, and each would compile coleta's modules anew (a third
## of a daemon's start-up CPU).
TEST_WORKERS ?= 3
test: venv prometheus-tools
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

## the Prometheus tests (tests/ops) scrape the daemon with a real Prometheus and check the alert
## rules with promtool: Debian's prometheus package has both (no package index has them). As
## root on Debian or Ubuntu it is installed here; elsewhere this says what to install.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: installing Debian's prometheus package (prometheus, promtool) for tests/ops"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends prometheus >/dev/null; \
	else \
	  echo "make: WARNING: no prometheus/promtool: the Prometheus tests in tests/ops will fail;"\
	    "install Debian's prometheus package (sudo apt-get install prometheus)"; \
	fi

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
