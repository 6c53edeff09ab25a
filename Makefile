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

.DEFAULT_GOAL := help
.PHONY: help venv .venv run test lint format train clean

help:
	@echo "make run    tritonserver + gateway on :$(GATEWAY_PORT) (GATEWAY_PORT, TRITON_*_PORT)"
	@echo "make test   the whole test suite (unit + integration; needs Redis for some tests)"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make train  retrain the models in model_repository/"

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

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

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
