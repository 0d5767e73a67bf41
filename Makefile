# Every target installs what it needs into .venv first, so a fresh clone
# needs nothing but `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BUF := npx --yes @bufbuild/buf@1.75.0
PROTOS := protos/authgrpc/v1/auth.proto protos/authgrpc/example/v1/greeter.proto

.PHONY: install run run-example test test-fast lint format proto proto-check bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/authgrpc serve --dev

run-example: install
	$(BIN)/python -m authgrpc.example --listen 127.0.0.1:50061 --auth-target 127.0.0.1:50051

proto: install
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

proto-check: install
	$(BIN)/python tools/check_generated.py

lint: install proto-check
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy authgrpc benchmarks
	$(BUF) lint
	$(BIN)/python tools/check_breaking.py

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache clients/node/node_modules
