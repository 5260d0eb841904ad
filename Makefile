# The two set-up commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CNI_BIN := bin/cni/tulle
STAMPS := .make

.PHONY: all deps venv cni demo test unit doctest lint bench chaos fuzz kubernetes clean

all: cni

$(STAMPS):
	mkdir -p $(STAMPS)

deps: $(STAMPS)/deps
$(STAMPS)/deps: scripts/install-deps | $(STAMPS)
	./scripts/install-deps
	touch $@

venv: $(STAMPS)/venv
$(STAMPS)/venv: pyproject.toml $(STAMPS)/deps | $(STAMPS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# The CNI plugin: a zipapp of the stdlib-only modules, started by /usr/bin/python3 -S.
cni: $(CNI_BIN)
$(CNI_BIN): $(wildcard src/tulle/cni/*.py) src/tulle/__init__.py scripts/build-cni-plugin $(STAMPS)/venv
	$(PY) scripts/build-cni-plugin $@

demo: deps venv cni
	$(VENV)/bin/tulle demo $(DEMO_ARGS)

lint: venv
	$(PY) -m ruff check src tests bench
	$(PY) -m ruff format --check src tests bench
	$(PY) -m mypy

unit: venv cni
	$(PY) -m pytest -q tests/unit

# The examples in docstrings run as written (those that need root, a lab or a datastore say +SKIP).
doctest: venv
	$(PY) -m pytest -q --doctest-modules src/tulle

test: deps venv cni lint doctest
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# A long chaos round (tests/e2e/test_chaos.py); `make test` runs a bounded one.
# CHAOS_SEED=N replays a round's choice of faults.
CHAOS_SECONDS ?= 600
chaos: deps venv cni
	CHAOS_SECONDS=$(CHAOS_SECONDS) $(PY) -m pytest -q -s tests/e2e/test_chaos.py

# Coverage-guided fuzzing (atheris) of the plugin, admission and the agent's socket protocol:
# FUZZ_RUNS executions of each (docs/fuzzing.md); `make test` runs a short round of each.
FUZZ_RUNS ?= 100000
fuzz: venv cni
	$(PY) -m tests.fuzz.run --runs $(FUZZ_RUNS) $(FUZZ_ARGS)

# The upstream Kubernetes binaries of the `--kubernetes` lab, built once from the Go module proxy
# into a cache outside the checkout (/var/cache/tulle/kubernetes/VERSION; docs/kubernetes.md).
kubernetes: deps
	./scripts/build-kubernetes

bench: deps venv cni
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf bin $(STAMPS) build src/*.egg-info
