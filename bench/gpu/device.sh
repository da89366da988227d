#!/usr/bin/env bash
# Device half of the GPU recipe.  Runs in the repo root on the GPU machine, one
# `run` call per carried bundle, back to back (the machine forgets everything
# once it has been idle 30 s):
#   call 1  carry .gpu/deps.tar      bash bench/gpu/device.sh deps
#   call 2  carry .gpu/vllm.part00   bash bench/gpu/device.sh part 00
#   ...                              (parts 01, 02, 03)
#   call 6  carry .gpu/vllm.part04   bash bench/gpu/device.sh final 04
# Everything is kept in $STASH (outside the repo copy, which each call replaces);
# packages go to $SITE (pip --target) and are used through PYTHONPATH.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
STASH=${STASH:-/root/stash}
SITE=${SITE:-/root/site}
OUT=${OUT:-/tmp/out}
VLLM_WHL=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_SHA=adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# flashinfer-python is not carried: without this the V2 model runner's Sampler imports
# vllm.v1.attention.backends.flashinfer and the engine dies with "No module named 'flashinfer'".
export VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
PIP="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE"
mkdir -p "$STASH" "$OUT"
T0=$(date +%s.%N)
el() { python3 -c "import time; print(f'{time.time()-$T0:.1f}s')"; }

case "${1:?deps|part N|final N|realsize|check|migration|scaling}" in
deps)
  echo "stash before: $(ls $STASH 2>/dev/null | tr '\n' ' ')"
  cp .gpu/deps.tar "$STASH/" && tar -xf "$STASH/deps.tar" -C "$STASH" && rm "$STASH/deps.tar" || exit 1
  (cd "$STASH" && sha256sum -c --quiet SHA256SUMS.deps) && echo "deps checksums OK" || exit 1
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
  echo "python: $(which python3) $(python3 -V 2>&1); gcc: $(gcc --version 2>/dev/null | head -1); curl: $(which curl)"
  opt=$(python3 -c "from importlib.metadata import version as v; from packaging.version import Version as V; print('' if V(v('typing_extensions'))>=V('4.14.1') else 'opt')")
  $PIP "$STASH"/deps/*.whl ${opt:+"$STASH"/opt/*.whl} 2>&1 | grep -v -i "warning: target directory" ; echo "pip rc=${PIPESTATUS[0]} (typing-extensions carried: ${opt:-no}) $(el)"
  python3 - <<'EOF'
from importlib.metadata import version
import importlib
bad = []
for m in "fastapi starlette pydantic uvicorn zmq openai msgspec xgrammar llguidance outlines_core mistral_common model_hosting_container_standards openai_harmony tvm_ffi".split():
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m}: {e!r}")
print("imports:", "OK" if not bad else "FAILED " + "; ".join(bad))
print(" ".join(f"{p}={version(p)}" for p in "torch transformers tokenizers huggingface_hub numpy triton typing_extensions anyio httpx pillow protobuf uvloop numba packaging setuptools".split()))
import torch; print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name(0))
EOF
  python3 "$HERE/check_reqs.py" "$SITE" "$HERE/skip.txt"
  echo "deps stage done $(el); du: $(du -sh $SITE | cut -f1)"
  ;;
part)
  cp ".gpu/vllm.part$2" "$STASH/" || exit 1
  echo "stash: $(cd $STASH && ls | tr '\n' ' ') $(el)"
  ;;
final)
  cp ".gpu/vllm.part$2" "$STASH/" || exit 1
  echo "stash: $(cd $STASH && ls | tr '\n' ' ')"
  [ -d "$SITE/fastapi" ] || { echo "deps not installed on this machine (it went cold?)"; exit 3; }
  cat "$STASH"/vllm.part* > "$STASH/$VLLM_WHL" && rm "$STASH"/vllm.part*
  echo "$VLLM_SHA  $STASH/$VLLM_WHL" | sha256sum -c || exit 2
  $PIP "$STASH/$VLLM_WHL" 2>&1 | grep -v -i "warning: target directory"; echo "vllm install rc=${PIPESTATUS[0]} $(el)"
  python3 -c "import vllm; print('vllm', vllm.__version__, vllm.__file__)"
  python3 "$HERE/check_reqs.py" "$SITE" "$HERE/skip.txt" | tail -15
  # The proxy's own needs the image lacks (orjson, pydantic-settings), carried in extra.tar.
  if [ -f .gpu/extra.tar ]; then mkdir -p "$STASH/extra" && tar -xf .gpu/extra.tar -C "$STASH/extra" && $PIP "$STASH"/extra/*.whl; fi
  echo "installed $(el)"
  ;;
realsize)
  # The hand-off at an 8B model's KV size against a single vLLM (bench/gpu/realsize.py).
  [ -d "$SITE/vllm" ] || { echo "vLLM not installed on this machine (it went cold?)"; exit 3; }
  export PYTHONPATH=$SITE:$(pwd)
  timeout 570 python3 "$HERE/realsize.py" ${REALSIZE_ARGS:-}; echo "realsize rc=$? total $(el)"
  ;;
check)
  # P/D through the proxy on vLLM 0.26 with the PDConnector (bench/gpu/pd_gpu.py).
  [ -d "$SITE/vllm" ] || { echo "vLLM not installed on this machine (it went cold?)"; exit 3; }
  if [ -f .gpu/extra.tar ] && [ ! -d "$SITE/orjson" ]; then mkdir -p "$STASH/extra" && tar -xf .gpu/extra.tar -C "$STASH/extra" && $PIP "$STASH"/extra/*.whl; fi
  export PYTHONPATH=$SITE:$(pwd)
  timeout 560 python3 "$HERE/pd_gpu.py"; echo "pd_gpu rc=$? total $(el)"
  ;;
migration)
  # Streams moved between two decode engines of the 8B shape on the one GPU, with the KV
  # and by recomputing (bench/migration.py --shape 8b-gpu).
  [ -d "$SITE/vllm" ] || { echo "vLLM not installed on this machine (it went cold?)"; exit 3; }
  export PYTHONPATH=$SITE:$(pwd)
  timeout 560 python3 -m bench.migration --shape 8b-gpu ${MIGRATION_ARGS:-} --log-dir "$OUT/logs" --out "$OUT/migration_gpu.json"; echo "migration rc=$? total $(el)"
  ;;
scaling)
  # PDPROXY_WORKERS on this machine's CPU cores (bench/scaling.py): the proxy, fake
  # engines and load generators only, no vLLM; after `deps` in the same call.
  [ -d "$SITE/fastapi" ] || { echo "deps not installed on this machine (run deps first)"; exit 3; }
  if [ ! -d "$SITE/orjson" ]; then mkdir -p "$STASH/extra" && tar -xf .gpu/extra.tar -C "$STASH/extra" && $PIP "$STASH"/extra/*.whl; fi
  export PYTHONPATH=$SITE:$(pwd)
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node)" ; ulimit -n 65536 2>/dev/null
  timeout 540 python3 -m bench.scaling ${SCALING_ARGS:-} --log-dir /root/scaling-logs --out "$OUT/scaling.json"; echo "scaling rc=$? total $(el)"
  # The logs stay here (the access logs are too big to carry back): what went wrong only.
  grep -h -v '"status":200,' /root/scaling-logs/pdproxy-w*.log | grep -v '"level": "INFO"' | head -400 > "$OUT/scaling-proxy-problems.txt"
  for f in /root/scaling-logs/*.log; do echo "$(basename $f): $(wc -l < $f) lines"; done
  ;;
esac
