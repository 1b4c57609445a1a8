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

GARAGE_ROOT := $(HOME)/.cache/meterflow/garage
GARAGE := $(GARAGE_ROOT)/bin/garage

.PHONY: loadtest run test test-long test-rust test-python bench bench-baseline bench-compare lint format services build clean garage

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Dependencies and the Rust core (release build, editable install). Checkouts
# share the cached target dir, so builds take a lock: one at a time.
$(VENV)/.built: $(PY) pyproject.toml $(RUST_SRC)
	@echo "==> building MeterFlow (Rust core + Python deps)"
	@mkdir -p $(CARGO_TARGET_DIR)
	flock $(CARGO_TARGET_DIR)/.meterflow-build.lock $(PY) -m pip install -q -e '.[dev]'
	@touch $@

build: $(VENV)/.built

run: build
	@echo "==> MeterFlow on http://127.0.0.1:$${MF_PORT:-3000} (embedded: chdb under ./data, no services)"
	$(VENV)/bin/meterflow serve

# Debian's redis-server, clickhouse-server and postgresql (the tests start them on loopback), and chromium for the dashboard tests.
services:
	@if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null \
	    || ! command -v clickhouse-server >/dev/null || ! { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v pdftotext >/dev/null \
	    || ! test -x /usr/bin/chromium; then \
	  echo "==> installing redis-server, clickhouse-server, postgresql, nginx (the documented proxy), poppler-utils (PDF checks) and chromium (dashboard tests) from Debian"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    redis-server redis-tools clickhouse-server postgresql nginx poppler-utils chromium >/dev/null; \
	fi

GARAGE_VERSION := 2.5.0
# Garage, the S3-compatible store the archive tests run against: built once from
# crates.io (about 15 minutes on 2 cores), then reused from ~/.cache/meterflow.
$(GARAGE):
	@echo "==> building Garage $(GARAGE_VERSION) (cargo install garage; cached in $(GARAGE_ROOT))"
	CARGO_TARGET_DIR=$(HOME)/.cache/meterflow/garage-target cargo install garage@$(GARAGE_VERSION) --locked --quiet --root $(GARAGE_ROOT)
	rm -rf $(HOME)/.cache/meterflow/garage-target

garage: $(GARAGE)

test-rust:
	cd rust_core && flock $(CARGO_TARGET_DIR)/.meterflow-build.lock cargo test --quiet

test-python: build services garage
	$(PY) -m pytest

test: services garage build test-rust test-python

test-long: build
	MF_BOOKS_EXAMPLES=2000 $(PY) -m pytest tests/billing/test_books_stateful.py

# Benchmarks: every run is saved by pytest-benchmark under .benchmarks/<machine>/NNNN_*.json
# (machine info included). `make bench-baseline` keeps one run as the baseline;
# `make bench-compare` runs the benches again, prints pytest-benchmark's table against
# the baseline and fails when a same-run ratio fell by more than BENCH_TOLERANCE.
# BENCH_COMPARE_FAIL=median:10% also fails on absolute medians (for quiet machines).
BENCH_TOLERANCE ?= 0.15
BENCH_COMPARE_FAIL ?=
BENCH_ARGS := benches --benchmark-enable --benchmark-autosave --benchmark-storage=file://.benchmarks -q

bench: build services garage
	@mkdir -p .benchmarks
	$(PY) -m pytest $(BENCH_ARGS) --benchmark-json=.benchmarks/last.json
	$(PY) benches/report.py .benchmarks/last.json

bench-baseline: build
	$(PY) benches/compare.py baseline $(RUN)

bench-compare: build services garage
	@test -f .benchmarks/baseline.json || { echo "no baseline: run make bench, then make bench-baseline" >&2; exit 2; }
	$(PY) -m pytest $(BENCH_ARGS) --benchmark-json=.benchmarks/compare.json \
	  $(if $(BENCH_COMPARE_FAIL),--benchmark-compare=$$(cat .benchmarks/baseline.id) --benchmark-compare-fail=$(BENCH_COMPARE_FAIL))
	$(VENV)/bin/pytest-benchmark compare .benchmarks/baseline.json .benchmarks/compare.json --group-by=group --columns=min,median,max,rounds
	$(PY) benches/compare.py check .benchmarks/compare.json --tolerance $(BENCH_TOLERANCE)

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

# The full stack on loopback (Redis, ClickHouse, PostgreSQL, Garage), MeterFlow in sync and
# async mode (with its `meterflow worker`s) against the naive baseline server (loadtest/naive.py)
# at batch 1000 and batch 1, CPU per process, the services' own ceilings as CPU per event with
# a two-core budget, a storage check, and a py-spy profile in test-output/ (~5 minutes).
LOADTEST_SECONDS ?= 8
loadtest: build services garage
	$(PY) -m pip install -q py-spy
	$(PY) -m loadtest.run --seconds $(LOADTEST_SECONDS) --profile
