# The two commands of the README's quick start are `make run` and `make test`; both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench native clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The native modules cimport picows' .pxd: build them against the very picows the venv runs with.
	$(PY) -m pip install -q 'setuptools>=77' wheel 'Cython>=3.0,<4' 'picows>=2.3,<2.4'
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# Cythonize and compile native/ into the package (a no-op when nothing changed).
native: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

run: native
	$(PY) -m gateway

test: native
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

bench: native
	$(PY) -m pytest -s -q bench --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf build $(VENV) gateway/*.so gateway/**/*.so native/**/*.c
