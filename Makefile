# The two commands of the README's quick start are `make run` and `make test`; both set up what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench native clean fuzz

# The first time (or after pyproject.toml/setup.py changed): pip shows what it installs, ~1-2 minutes.
$(STAMP): pyproject.toml setup.py
	@echo "make: setting up $(VENV): Python dependencies, then the native modules (the first time: ~2 minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The native modules cimport picows' .pxd: build them against the very picows the venv runs with.
	$(PY) -m pip install 'setuptools>=77' wheel 'Cython>=3.0,<4' 'picows>=2.3,<2.4'
	# Without compiling the native modules inside pip: `native` compiles them in place next, one line each.
	JMAP_GATEWAY_SKIP_NATIVE=1 $(PY) -m pip install --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# Cythonize and compile native/ into the package (a no-op when nothing changed), one line per module compiled,
# then one line saying the build is done.
native: $(STAMP)
	@$(PY) setup.py -q build_ext --inplace
	@$(PY) -m gateway.native

run: native
	$(PY) -m gateway

test: native
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The fuzzing suite (tests/fuzz, also part of `make test` with about a minute of fuzzing) for longer:
# FUZZ_SECONDS of fuzzing in all (default 30 min), counts printed at the end and written to FUZZ_REPORT if set.
FUZZ_SECONDS ?= 1800
fuzz: native
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(PY) -m pytest -q -s tests/fuzz $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: native
	$(PY) -m pytest -s -q bench --benchmark-only $(PYTEST_ARGS)

# The fan-out harness (bench/README.md, "Fan-out harness"): the gateway side by side with nchan, Node ws, Python
# websockets and the syscall floor, ~30 min. FANOUT_ARGS=--quick for a few minutes; --install the first time
# (apt-get nginx + libnginx-mod-nchan when missing, npm ci of the ws peer, pip install of the `bench` extra).
.PHONY: bench-fanout
bench-fanout: native
	$(PY) -m bench.harness $(FANOUT_ARGS)

clean:
	rm -rf build $(VENV) gateway/*.so gateway/**/*.so native/**/*.c

# WebSocket conformance: Autobahn|Testsuite's fuzzing client (cases 1-7, 9, 12-13) against the echo server,
# with wstest in its own Python 2.7 environment (.autobahn/). Results: docs/conformance.md.
.PHONY: conformance
conformance: native
	GATEWAY_PYTHON=$(PY) scripts/autobahn.sh $(AUTOBAHN_ARGS)
