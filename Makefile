# Two commands do all set-up on a fresh machine:
#   make demo   # installs, then generates from the embedded demo checkpoint on a local Ray cluster
#   make test   # installs, then runs the whole test suite (what CI runs)
# Both install the exact versions requirements.lock pins (with their hashes); `make lock` re-resolves it.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# NOTE: torch is the one package outside the lock: this machine's CPU build (pip takes 2.13.0 from the local wheel;
# a torch from the index would be a multi-GB CUDA build). The lock is resolved against this version.
TORCH := 2.13.0
PIP := 26.3

BUF := .tools/node_modules/.bin/buf

.PHONY: install demo test test-fast lock bench gpu-check gpu-wheels protos-check prometheus

# Nothing is resolved here: every package at its locked version and hash, without its dependencies (the lock holds
# them all), moeray itself editable with the locked setuptools, then pip check says the set is whole.
$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps torch==$(TORCH)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

# Re-resolves requirements.lock to the newest releases pyproject.toml's ranges admit (run it to take new releases,
# then `make test`; commit the lock only when that passes). pip-tools runs in a throwaway venv of its own.
lock:
	rm -rf .tools/lock && python3 -m venv .tools/lock
	.tools/lock/bin/pip install -q --upgrade pip pip-tools
	echo "torch==$(TORCH)" > .tools/lock/torch.txt
	CUSTOM_COMPILE_COMMAND="make lock" .tools/lock/bin/pip-compile --quiet --upgrade --generate-hashes \
		--strip-extras --extra test --all-build-deps --unsafe-package torch --unsafe-package pip \
		--no-emit-index-url --no-emit-find-links -c .tools/lock/torch.txt -o $(LOCK) pyproject.toml

# tests/telemetry scrapes moeray with a real Prometheus (Debian's package); nothing to do when it is on PATH.
prometheus:
	@if ! command -v prometheus >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1; then \
			(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				prometheus >/dev/null) || echo "warning: apt-get could not install prometheus (tests/telemetry needs it)"; \
		else \
			echo "warning: no apt-get here: install prometheus for tests/telemetry/test_prometheus.py"; \
		fi; \
	fi

install: $(VENV)/.installed prometheus

demo: install
	$(VENV)/bin/moeray generate --prompt "Hello, experts" --max-new-tokens 16 --workers 2

$(BUF):
	npm install --silent --prefix .tools @bufbuild/buf@1.75.0

# buf lint (KServe's package excepted, see protos/buf.yaml) and no breaking change against main
protos-check: $(BUF)
	$(BUF) lint protos
	if git rev-parse --verify -q main >/dev/null; then $(BUF) breaking protos --against '.git#branch=main,subdir=protos'; fi

test: install protos-check
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

# The unit and kernel tests: no Ray, no cluster, no servers (tests/conftest.py: --tier fast), a few minutes.
test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider --tier fast tests/unit tests/kernels

bench: install
	$(VENV)/bin/moeray bench layer

# On a GPU machine, with its own python3 (torch, triton, transformers; no venv, no Ray): the Triton kernels checked
# against the reference, then timed, and the in-process engine against transformers on the GPU (greedy ids, decode
# and prefill tokens/s); one table, non-zero exit on a failure (scripts/gpu_check.py, scripts/gpu_check_engine.py).
gpu-check:
	python3 scripts/gpu_check.py

# Here, before a device run: the locked wheels gpu-check needs that the GPU image lacks (transformers, HF kernels
# and what they need), for its Python 3.12, into .gpu-wheels/ (ignored): carry it; gpu-check installs from it.
gpu-wheels:
	python3 scripts/gpu_wheels.py download
