#!/usr/bin/env bash
# Local half of the GPU recipe: build the bundles that travel to the GPU machine.
#
#   bash bench/gpu/prepare.sh /path/to/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
#
# Needs: python3 with pip and `packaging` (any version that runs pip download) and
# network access to PyPI. Writes into the repo root (run from there):
#   .gpu/deps.tar        every non-vLLM wheel (deps/), typing-extensions (opt/) and
#                        SHA256SUMS.deps   (~40 MiB)
#   .gpu/extra.tar       what the proxy needs beyond vLLM's dependencies (orjson,
#                        pydantic-settings)
#   .gpu/vllm.part00..04 the unmodified vLLM wheel cut in 5 equal pieces (~58 MiB each)
# and adds /.gpu/ to .git/info/exclude so the bundles are never committed.
set -euo pipefail
VLLM_WHL=${1:?path to vllm-0.26.0 wheel}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${WORK:-/tmp/gpu-bundle}
rm -rf "$WORK" && mkdir -p "$WORK/deps" "$WORK/opt"

# 1. vLLM's missing runtime deps and their deps, versions pinned to the
#    2026-07-26 resolution of vllm==0.26.0 (except xgrammar, see the notes).
python3 "$HERE/resolve_wheels.py" "$HERE/reqs-top.txt" "$HERE/device_pkgs.txt" \
    "$WORK/deps" "$HERE/skip.txt" "$HERE/vllm-lock-2026-07-26.txt" | tee "$WORK/resolve.log"

# 2. typing-extensions, installed there only if the image's is older than pydantic needs.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$WORK/opt" typing-extensions==4.16.0

# 3. the proxy's own needs that vLLM's dependencies lack.
mkdir -p "$WORK/extra"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WORK/extra" orjson==3.11.4 pydantic-settings==2.11.0

# 4. checksums, tar, split.
(cd "$WORK" && find deps opt -type f | sort | xargs sha256sum > SHA256SUMS.deps)
mkdir -p .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
rm -f .gpu/deps.tar .gpu/vllm.part*
tar -cf .gpu/deps.tar -C "$WORK" deps opt SHA256SUMS.deps
tar -cf .gpu/extra.tar -C "$WORK/extra" .
split -n 5 -d -a 2 "$VLLM_WHL" .gpu/vllm.part
sha256sum "$VLLM_WHL"
ls -la .gpu
