# The two commands a fresh clone needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/controlplane/api/v1/*.proto proto/controlplane/api/flagd/sync/v1/*.proto)

.PHONY: run test test-faults lint proto proto-check bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start a local etcd (embedded) and the control server on 127.0.0.1:50051, with its
## HTTP/JSON mirror on 127.0.0.1:8016 (ARGS="--http HOST:PORT" moves it).
run: $(STAMP)
	$(BIN)/controlplane serve --http 127.0.0.1:8016 $(ARGS)

## Run the whole test suite (starts its own etcd and servers; a reduced fault set).
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## The fault suite alone, whole and at full length (RELIABILITY.md).
test-faults: $(STAMP)
	CONTROLPLANE_FAULTS=full $(BIN)/python -m pytest -q tests/faults $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy controlplane agents tests benchmarks

## Regenerate the protobuf code in controlplane/api/v1 from proto/.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto \
	    --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

## Regenerate and fail if the committed generated code differs.
proto-check: proto
	git diff --exit-code -- controlplane/api/ || \
	    (echo "generated code in controlplane/api/ is out of date: run make proto and commit" >&2; exit 1)
	test -z "$$(git status --porcelain -- controlplane/api/)" || \
	    (echo "untracked generated files in controlplane/api/: run make proto and commit" >&2; git status --porcelain -- controlplane/api/ >&2; exit 1)

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .controlplane .pytest_cache .mypy_cache .ruff_cache
