# graft — the commands a newcomer needs. `make setup && make test` on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_ROOT ?= models
HOST ?= 127.0.0.1
PORT ?= 3000
GRPC_PORT ?= 50051

.PHONY: setup test lint serve bench bench-quick proto clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	PYTHON=$(PYTHON) bash tests/setup_tritonclient.sh  # the V2 client tests' own venv (tritonclient)
	PYTHON=$(PYTHON) bash tests/setup_kserve.sh  # and KServe's own client's (kserve)

lint:
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest

serve:
	$(BIN)/graft serve --model-root $(MODEL_ROOT) --host $(HOST) --port $(PORT) --grpc-port $(GRPC_PORT)

bench:
	$(BIN)/python -m bench

bench-quick:
	$(BIN)/python -m bench --quick

proto:
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
