# creditledger: every command installs what it needs into .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
CLI     := $(VENV)/bin/creditledger
STAMP   := $(VENV)/.installed-stamp
PYTHON3 ?= python3

.PHONY: install test check lint migrate serve worker bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check shim tests bench
	$(VENV)/bin/ruff format --check shim tests bench

check: lint test

migrate: $(STAMP)
	$(CLI) migrate

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pgdata demo-output bench/out

serve: $(STAMP)
	$(CLI) serve

worker: $(STAMP)
	$(CLI) worker

demo: $(STAMP)
	$(CLI) demo

# CI's whole pipeline (.ci/run: apt packages, embedded and PostgreSQL 15 legs, plpgsql_check lint,
# coverage); run it as root. `coverage`: the suite with Python and PL/pgSQL statement coverage, for a
# TEST_DATABASE_URL server that preloads plpgsql_check with plpgsql_check.profiler = on.
.PHONY: ci coverage
ci:
	bash .ci/run

coverage: $(STAMP)
	$(PY) -m pytest -p tests.plpgsql_coverage --cov=shim --cov-report=term $(PYTEST_ARGS)
