# Two commands set everything up on a fresh machine: `make demo` and `make test` (CI: every test;
# `make test-fast` skips the ones marked slow).
# Another interpreter and venv, e.g. `make test PYTHON=python3.12 VENV=.venv312`: the same locked versions
# (constraints.txt) on Python 3.11-3.13.
PYTHON ?= python3.11
VENV   ?= .venv
LOCK   ?= constraints.txt
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_output

.PHONY: install test test-fast demo demo-waterbirds bench clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/bgmask demo --out $(DEMO_OUT)

demo-waterbirds: $(STAMP)
	$(VENV)/bin/bgmask demo --protocol waterbirds --out $(DEMO_OUT)_waterbirds

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(DEMO_OUT)_waterbirds .pytest_cache
