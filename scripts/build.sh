#!/usr/bin/env bash
# Build libedkm, the Python module (in place, under python/edkm) and the C++ tests, in build/.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cd "$here"
EDKM_BUILD_TESTS=ON EDKM_BUILD_DIR="$here/build" EDKM_BUILD_JOBS=${EDKM_BUILD_JOBS:-$(nproc)} \
  "$env/bin/python" setup.py -q build_ext --inplace
