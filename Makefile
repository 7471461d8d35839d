# Neural Cloud: two commands on a fresh machine.
#   make up    create .venv, install, start a whole local network, print how to call it
#   make test  install what the tests need and run them
#   make test-unit  the fast layer only: no servers, no processes, no real weights

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)

CHROMIUM := /usr/bin/chromium
# anchorpy (the IDL client of programs/audit.py) pins older solana-py and solders than the
# market's: it gets its own environment
ANCHORPY := .venv-anchorpy/bin/python
CLANG    := /usr/bin/clang-19
PROGRAM  := build/programs/aidp_market.so

.PHONY: up test test-unit install clean lint bench programs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

# llama.cpp is compiled on install. On x86-64 it is built for AVX2 rather than
# -march=native: a virtual CPU may advertise AMX that the process may not use (SIGILL
# in ggml's AMX kernels). No pip cache: a wheel built with other flags is never reused.
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)

$(STAMP): $(BIN)/python pyproject.toml
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-cache-dir 'llama-cpp-python>=0.3'
	$(PIP) install -q -e '.[market,ledger,node,transformers,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the explorer's browser test (Playwright drives it; no browser download).
$(CHROMIUM):
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "chromium could not be installed: the browser test will be skipped"

# Debian's clang-19 compiles the on-chain program (programs/) to BPF; our own linker
# (programs/link.py) makes the SBPF v0 ELF. See ../shared/ONCHAIN.md.
$(CLANG):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq clang-19 llvm-19

$(PROGRAM): $(CLANG) install $(wildcard programs/*.py programs/include/*.h programs/*/*.c programs/*/idl.json)
	$(BIN)/python programs/build.py

programs: $(PROGRAM)

$(ANCHORPY):
	$(PYTHON) -m venv .venv-anchorpy
	$(ANCHORPY) -m pip install -q 'anchorpy==0.21.0'

up: install $(PROGRAM)
	$(BIN)/aidp-market up

test: install $(CHROMIUM) $(PROGRAM) $(ANCHORPY)
	$(BIN)/lint-imports  # the dependency rule in pyproject.toml
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

# The unit layer: no PostgreSQL or Redis, no market/ledger/node/worker processes, no real
# model weights (the markers are in pyproject.toml, set by tests/conftest.py). Under a
# minute on 2 cores.
UNIT := not services and not weights and not slow

test-unit: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -ra -m "$(UNIT)" $(PYTEST_ARGS)

bench: install $(CLANG)
	for b in adversarial gateway node verify verify_cost embedding program settle settle_market; do \
	  echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

clean:
	rm -rf .aidp test-artifacts
