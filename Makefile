# The two commands a user needs: `make run` and `make test`. Both install what they need first,
# and are quick when everything is already installed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PB := server/lorax_server/pb
MODEL_ID ?= models/demo
PORT ?= 8080

.PHONY: install run test test-rust test-python lint fmt clean

install: $(VENV)/.python-installed $(PB)/generate_pb2.py

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Editable install of the shard with its test extras; redone when its metadata changes.
$(VENV)/.python-installed: $(VENV)/bin/python server/pyproject.toml
	$(PIP) install --quiet -e 'server[test]'
	touch $@

# gRPC stubs are generated, never committed. grpc_tools writes an absolute import; make it relative.
$(PB)/generate_pb2.py: proto/generate.proto $(VENV)/.python-installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(PB) --pyi_out=$(PB) --grpc_python_out=$(PB) proto/generate.proto
	sed -i 's/^import generate_pb2 as/from . import generate_pb2 as/' $(PB)/generate_pb2_grpc.py

run: install
	@if [ ! -x $(VENV)/bin/lorax-launcher ]; then echo "router not built yet: lorax-launcher is not in $(VENV)/bin"; exit 1; fi
	$(VENV)/bin/lorax-launcher --model-id $(MODEL_ID) --port $(PORT)

test: install test-python

test-python: install
	$(VENV)/bin/pytest -q server/tests $(wildcard integration-tests/test_*.py)

lint:
	$(VENV)/bin/ruff check .

fmt:
	$(VENV)/bin/ruff format server integration-tests

clean:
	rm -rf $(VENV) router/target launcher/target $(PB)/generate_pb2*.py $(PB)/generate_pb2*.pyi
