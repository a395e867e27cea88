# Two commands matter: `make up` (the appliance on its embedded stack) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export APPLIANCE_VAR_DIR ?= var

.PHONY: install up down status test test-fast lint bench openapi clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
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

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

openapi: $(STAMP)
	$(BIN)/appliance openapi --out openapi.json

clean:
	-$(BIN)/appliance stack down
	rm -rf var/test
