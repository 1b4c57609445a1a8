# The project's vocabulary: run, test, bench, lint, format.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The Rust build is cached outside the checkout so fresh clones reuse it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/meterflow/target
export PATH := $(HOME)/.cargo/bin:$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUST_SRC := $(shell find rust_core/src -name '*.rs') rust_core/Cargo.toml rust_core/Cargo.lock

.PHONY: run test test-rust test-python bench lint format services build clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies and the Rust core (release build, editable install).
$(VENV)/.built: $(PY) pyproject.toml $(RUST_SRC)
	@echo "==> building MeterFlow (Rust core + Python deps)"
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

build: $(VENV)/.built

run: build
	@echo "==> MeterFlow on http://127.0.0.1:$${MF_PORT:-3000} (embedded: chdb under ./data, no services)"
	$(VENV)/bin/meterflow serve

# Debian's redis-server and clickhouse-server; the tests start them on loopback.
services:
	@if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null \
	    || ! command -v clickhouse-server >/dev/null; then \
	  echo "==> installing redis-server and clickhouse-server from Debian"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    redis-server redis-tools clickhouse-server >/dev/null; \
	fi

test-rust:
	cd rust_core && cargo test --quiet

test-python: build services
	$(PY) -m pytest

test: services build test-rust test-python

bench: build services
	@mkdir -p .benchmarks
	$(PY) -m pytest benches --benchmark-enable --benchmark-json=.benchmarks/last.json -q
	$(PY) benches/report.py .benchmarks/last.json

lint: build
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest meterflow._core
	cd rust_core && cargo clippy --quiet -- -D warnings

format: build
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches
	cd rust_core && cargo fmt

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
