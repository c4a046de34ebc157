# The two commands a user needs: `make run` and `make test`. Both install what they need first,
# and are quick when everything is already installed.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PB := server/lorax_server/pb
MODEL_ID ?= models/demo
PORT ?= 8080

RUST_BINS := $(VENV)/bin/lorax-router $(VENV)/bin/lorax-launcher

.PHONY: install run test test-rust test-python chromium docs lint fmt clean image check-image FORCE

# Helm, for the chart's tests (integration-tests/test_helm_chart.py): built from its Go module
# once into the ignored .tools/ folder and reused. `go` from PATH, else the usual install place.
HELM := .tools/bin/helm
HELM_VERSION := v3.22.0
GO ?= $(or $(shell command -v go 2>/dev/null),/usr/local/go/bin/go)

install: $(VENV)/.python-installed $(PB)/generate_pb2.py $(VENV)/.cpu-kernels-built $(RUST_BINS)

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Editable install of the shard with its test, bench and docs extras; redone when its metadata changes.
# The acceptance clients pin an old huggingface_hub that breaks transformers 5: installed without
# their dependencies (theirs that we need, aiohttp and pydantic, come with the test extras).
$(VENV)/.python-installed: $(VENV)/bin/python server/pyproject.toml
	$(PIP) install --quiet -e 'server[test,bench,docs]'
	$(PIP) install --quiet --no-deps lorax-client==0.6.3 text-generation==0.7.0
	touch $@

# The CPU kernels (low-bit matmul, paged decode attention, RMSNorm and rotary, LoRA), compiled once into
# torch's extension cache (a failed build fails here, rather than leaving the shard on its slow path).
CPU_KERNEL_SOURCES := $(wildcard server/lorax_server/layers/csrc/*.cpp server/lorax_server/layers/quant/csrc/*.cpp \
	server/lorax_server/adapters/csrc/*.cpp)
$(VENV)/.cpu-kernels-built: $(CPU_KERNEL_SOURCES) server/lorax_server/utils/cpu_extension.py $(VENV)/.python-installed
	$(PY) -m lorax_server.utils.cpu_extension --build
	touch $@

# gRPC stubs are generated, never committed. grpc_tools writes an absolute import; make it relative.
$(PB)/generate_pb2.py: proto/generate.proto $(VENV)/.python-installed
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(PB) --pyi_out=$(PB) --grpc_python_out=$(PB) proto/generate.proto
	sed -i 's/^import generate_pb2 as/from . import generate_pb2 as/' $(PB)/generate_pb2_grpc.py

# Release builds of the Rust binaries, copied into the venv so they sit beside lorax-server.
# cargo decides what to rebuild; the copy only happens when the binary changed.
$(VENV)/bin/lorax-%: FORCE $(VENV)/bin/python
	cargo build --release --quiet --manifest-path $*/Cargo.toml
	@cmp -s $*/target/release/lorax-$* $@ || install -m 0755 $*/target/release/lorax-$* $@

FORCE:

run: install
	@if [ ! -x $(VENV)/bin/lorax-launcher ]; then echo "lorax-launcher is missing from $(VENV)/bin: run make install"; exit 1; fi
	$(VENV)/bin/lorax-launcher --model-id $(MODEL_ID) --port $(PORT)

test: install chromium test-rust test-python

# The documentation site (mkdocs.yml) on http://localhost:$(DOCS_PORT), rebuilt on every edit.
# `make test` builds it with --strict (integration-tests/test_docs_site.py).
DOCS_PORT ?= 8000
docs: $(VENV)/.python-installed
	$(VENV)/bin/mkdocs serve --dev-addr localhost:$(DOCS_PORT)

# Debian's headless-capable Chromium for the playground's browser test (playwright drives it; its
# own browser download is not used). Installed with apt when missing, as root or through sudo.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium: $(CHROMIUM)

$(CHROMIUM):
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

# Release profile: reuses the dependencies the install step already compiled.
test-rust: install
	cargo test --release --quiet --manifest-path launcher/Cargo.toml
	cargo test --release --quiet --manifest-path router/Cargo.toml

$(HELM):
	GOBIN=$(CURDIR)/.tools/bin $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

test-python: install chromium $(HELM)
	$(VENV)/bin/pytest -q server/tests $(wildcard integration-tests/test_*.py)

# The CPU Docker image on a Debian base made here (docs/docker.md). Slow, so not part of `test`:
# `image` builds it, `check-image` also runs it on the demo model and checks its answers.
image:
	scripts/check_image.sh --build-only

check-image:
	scripts/check_image.sh

lint:
	$(VENV)/bin/ruff check .
	cargo fmt --check --manifest-path router/Cargo.toml
	cargo fmt --check --manifest-path launcher/Cargo.toml
	cargo clippy --release --quiet --manifest-path router/Cargo.toml -- -D warnings
	cargo clippy --release --quiet --manifest-path launcher/Cargo.toml -- -D warnings

fmt:
	$(VENV)/bin/ruff format server integration-tests

clean:
	rm -rf $(VENV) .tools router/target launcher/target $(PB)/generate_pb2*.py $(PB)/generate_pb2*.pyi
