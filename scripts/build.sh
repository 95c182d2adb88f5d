#!/usr/bin/env bash
# Build libedkm, the Python module (in place, under python/edkm) and the C++ tests, in build/.
# Quiet unless it fails (the full log is build/build.log); EDKM_VERBOSE=1 shows it all.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cd "$here"
. "$here/scripts/compiler_cache.sh"
mkdir -p build
export EDKM_BUILD_TESTS=ON EDKM_BUILD_DIR="$here/build" EDKM_BUILD_JOBS=${EDKM_BUILD_JOBS:-$(nproc)}
if [ -n "${EDKM_VERBOSE:-}" ]; then
  "$env/bin/python" setup.py -q build_ext --inplace
else
  echo "edkm: building (log: build/build.log)" >&2
  if ! "$env/bin/python" setup.py -q build_ext --inplace > build/build.log 2>&1; then
    grep -E "error|Error" -A3 build/build.log | head -60 >&2 || true
    tail -n 20 build/build.log >&2
    echo "edkm: build failed (full log: build/build.log)" >&2
    exit 1
  fi
fi
if [ -n "${EDKM_COMPILER_LAUNCHER:-}" ]; then
  "$EDKM_COMPILER_LAUNCHER" --show-stats 2>/dev/null | grep -E "^(Compile requests|Cache hits|Cache misses) " \
    | tr -s ' ' | paste -sd ';' | sed 's/^/edkm: compiler cache: /' >&2 || true
fi

