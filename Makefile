# Two commands do all set-up on a fresh machine:
#   make demo   # installs, then generates from the embedded demo checkpoint on a local Ray cluster
#   make test   # installs, then runs the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

BUF := .tools/node_modules/.bin/buf

.PHONY: install demo test bench gpu-check protos-check prometheus

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# NOTE: the CPU build of torch first; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

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

bench: install
	$(VENV)/bin/moeray bench layer

# On a GPU machine, with its own python3 (torch, triton, transformers; no venv, no Ray): the Triton kernels checked
# against the reference, then timed, and the in-process engine against transformers on the GPU (greedy ids, decode
# and prefill tokens/s); one table, non-zero exit on a failure (scripts/gpu_check.py, scripts/gpu_check_engine.py).
gpu-check:
	python3 scripts/gpu_check.py
