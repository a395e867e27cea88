# Two commands matter: `make up` (the appliance on its embedded stack) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export APPLIANCE_VAR_DIR ?= var

.PHONY: install up down status test lint deploy-tools deploy-lint deploy-check deploy-test openapi clean bench bench-1m bench-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,stack]'
	touch $(STAMP)

install: $(STAMP)

## Start PostgreSQL, Redis, S3 and Vault on loopback, migrate, and run the API on :8080 (background).
up: $(STAMP)
	$(BIN)/appliance stack up --api
	@echo "API: http://127.0.0.1:8080  (admin key in $(APPLIANCE_VAR_DIR)/admin.key; stop with 'make down')"

down: $(STAMP)
	$(BIN)/appliance stack down

status: $(STAMP)
	$(BIN)/appliance stack status

## Everything CI runs: ruff, the deployment's static checks, the whole suite against real servers, then
## the converge test (deploy-test: the installer's path, as root).
test: $(STAMP) deploy-tools
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(MAKE) --no-print-directory deploy-lint
	DEPLOY_CHECK_REQUIRE_SYSTEMD=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
	$(MAKE) --no-print-directory deploy-test

lint: $(STAMP)
	$(BIN)/ruff check .

## systemd-analyze is needed to verify the units (Debian's systemd package; installed when missing).
deploy-tools:
	@command -v systemd-analyze >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -qqy --no-install-recommends systemd >/dev/null; }

## ansible-lint (production profile, offline) and the playbook's syntax check.
deploy-lint: $(STAMP)
	cd ansible && PATH="$(CURDIR)/$(BIN):$$PATH" ansible-lint --nocolor
	cd ansible && PATH="$(CURDIR)/$(BIN):$$PATH" ansible-playbook --syntax-check -i inventory/example.yml site.yml

## Deployment checks (~2.5 min): lint, syntax, systemd-analyze verify + exposure <= 2.0, and the
## vault and object_store role steps against real servers (tests/deploy). Part of `make test`.
deploy-check: $(STAMP) deploy-tools
	VENV=$(CURDIR)/$(VENV) scripts/deploy-check.sh

## Converge test (root, ~6 min; the last step of `make test`): the offline bundle an installer builds
## (pure-Python wheel, wheelhouse for the target's Python, no [stack] extra), site.yml twice against a
## debootstrap Debian 13 root (2nd run changed=0), then the root booted with systemd-nspawn and
## converged twice more with services on.
deploy-test: $(STAMP)
	VENV=$(CURDIR)/$(VENV) scripts/deploy-test.sh

## wrk drives /v1/match from C, so the 2-core box measures the server, not a Python client (Debian's wrk).
bench-tools:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -qqy --no-install-recommends wrk >/dev/null; } \
	    || echo "wrk unavailable: bench/match.py reports its Python client only"

## Benchmarks (not in CI, ~35 min): JSON under bench/results/, each with its baseline from the same run.
bench: $(STAMP) bench-tools
	$(BIN)/python bench/match.py --n 10000 --n 100000 --track-frames 5
	$(BIN)/python bench/accuracy.py
	$(BIN)/python bench/enrol.py
	$(BIN)/python bench/media.py
	$(BIN)/python bench/audit.py
	$(BIN)/python bench/erasure.py
	$(BIN)/python bench/visits.py

## The 1M-encoding match benchmark (loads 1M encodings by COPY once, ~1 min; each run ~10 min).
bench-1m: $(STAMP) bench-tools
	$(BIN)/python bench/match.py --n 1000000 --skip-pgvector --direct-load

openapi: $(STAMP)
	$(BIN)/appliance openapi --out openapi.json

clean:
	-$(BIN)/appliance stack down
	rm -rf var/test
