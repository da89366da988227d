# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target proxy  -t pdproxy:0.1.0 .          # the proxy: slim, no torch, no vLLM
#   docker build --target engine -t pdproxy-engine:0.1.0 .   # vLLM plus the PDConnector plug-in
# `docker build .` alone builds the proxy (the last stage).
#
# tests/unit/deploy/test_dockerfile.py runs the proxy stages' COPY and RUN steps in a fresh venv,
# and lints this file with hadolint: keep the RUN steps plain `python -m pip ...` lines.

ARG PYTHON_IMAGE=python:3.11-slim
ARG VLLM_IMAGE=vllm/vllm-openai:v0.26.0

# --- builder: the pdproxy wheel (the proxy package only) ---------------------------------
FROM ${PYTHON_IMAGE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ ./proxy/
RUN python -m pip wheel --no-deps --no-cache-dir --wheel-dir /wheels .

# --- engine: vLLM with engine_ext importable in every vLLM process -----------------------
FROM ${VLLM_IMAGE} AS engine
# pyzmq comes with vLLM; install it only if a custom base lacks it.
RUN python3 -c "import zmq" 2>/dev/null || python3 -m pip install --no-cache-dir "pyzmq>=25"
COPY engine_ext/ /opt/pdproxy/engine_ext/
# A .pth file puts /opt/pdproxy on sys.path for the API server, the engine core and the
# workers alike, whatever PYTHONPATH the base image or the operator sets.
RUN python3 -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'pdproxy-engine-ext.pth').write_text('/opt/pdproxy\n')" \
 && python3 -c "import engine_ext"
# 8000 OpenAI API; 5599 connector control (/pd/release, /pd/stats, /metrics);
# 5600 connector ZMQ (TP rank r listens on 5600 + r).
EXPOSE 8000 5599 5600
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]

# --- proxy: the slim runtime --------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS proxy
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=builder /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl \
 && rm -rf /wheels
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin pdproxy
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8000
# Python's stdlib (no curl in slim). It sends the first PDPROXY_API_KEYS key, if any, so
# that it passes with PDPROXY_PROTECT_OPS_ENDPOINTS=true too.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; k = os.environ.get('PDPROXY_API_KEYS', '').split(',')[0].strip(); r.urlopen(r.Request('http://127.0.0.1:%s/health' % os.environ.get('PDPROXY_PORT', '8000'), headers={'Authorization': 'Bearer ' + k} if k else {}), timeout=2)"]
ENTRYPOINT ["pdproxy"]
