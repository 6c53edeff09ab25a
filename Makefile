# Switchyard developer commands. A fresh clone needs only python3 (3.11+) on PATH:
# every target that runs code first builds .venv from pyproject.toml.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

CONFIG ?= configs/gateway.yaml
GATEWAY_PORT ?= 8080
TRITON_HTTP_PORT ?= 8000
TRITON_GRPC_PORT ?= 8001
TRITON_METRICS_PORT ?= 8002
PYTEST_ARGS ?=
SCENARIO ?= steady
LOADTEST_HOST ?= http://127.0.0.1:$(GATEWAY_PORT)

.DEFAULT_GOAL := help
.PHONY: help venv .venv run test lint format train clean loadtest bench deps screenshots walkthrough

help:
	@echo "make run    two tritonservers (primary, fallback) + the gateway on :$(GATEWAY_PORT)"
	@echo "make test   the whole test suite (unit + integration; needs Redis for some tests)"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make train  retrain the models in model_repository/"
	@echo "make loadtest SCENARIO=steady|ramp|spike|soak  locust, headless, against LOADTEST_HOST"
	@echo "make bench  side-by-side benchmark: Triton direct vs through the gateway"
	@echo "make screenshots  regenerate docs/images/status-page.png (needs Redis, chromium)"
	@echo "make walkthrough  the README's model-lifecycle walkthrough on its own stack"

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Reinstall only when pyproject.toml changed since the last install.
$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

venv .venv: $(STAMP)

run: $(STAMP)
	$(VPY) -m gateway up --config $(CONFIG) --port $(GATEWAY_PORT) \
		--triton-http-port $(TRITON_HTTP_PORT) --triton-grpc-port $(TRITON_GRPC_PORT) \
		--triton-metrics-port $(TRITON_METRICS_PORT)

# System tools the tests use: Prometheus + promtool (Debian's `prometheus`), kubectl for
# `kubectl kustomize` of deploy/k8s (Debian's `kubernetes-client`) and headless Chromium for
# the status page. Installed only when missing and we are root (CI, containers); otherwise a
# hint is printed and the tests that need them skip locally (and fail under CI).
deps:
	@missing=""; \
	{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || missing="prometheus"; \
	command -v chromium >/dev/null 2>&1 || missing="$${missing:+$$missing }chromium"; \
	command -v kubectl >/dev/null 2>&1 || missing="$${missing:+$$missing }kubernetes-client"; \
	command -v openssl >/dev/null 2>&1 || missing="$${missing:+$$missing }openssl"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $$missing with apt-get"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
			>/dev/null; \
	else echo "note: missing $$missing; run 'sudo apt-get install $$missing'"; fi

test: $(STAMP) deps
	$(VPY) -m pytest $(PYTEST_ARGS)

# Locust scenario against a running gateway (make run); reports in loadtest/reports/, exit 1
# when the scenario's p99 or error-rate threshold fails.
loadtest: $(STAMP)
	@mkdir -p loadtest/reports
	$(VENV)/bin/locust --config loadtest/scenarios/$(SCENARIO).conf --host $(LOADTEST_HOST)

# Starts its own Triton and gateway on free ports; BENCH_ARGS e.g. "--workers 2 --duration 20".
BENCH_ARGS ?=
bench: $(STAMP)
	$(VPY) -m loadtest.bench --start $(BENCH_ARGS)

# The README's status-page picture (docs/images/status-page.png): needs Redis and chromium.
screenshots: $(STAMP) deps
	$(VPY) docs/screenshots.py

# The README's model-lifecycle walkthrough on its own `make run` stack (free ports, copies of
# the routes and models); `.venv/bin/python docs/walkthrough.py` runs it against `make run`.
walkthrough: $(STAMP) deps
	$(VPY) docs/walkthrough.py --start --png var/walkthrough/rollout-report.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy gateway

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

train: $(STAMP)
	$(VPY) model_repository/train.py

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
