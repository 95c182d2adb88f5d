#!/usr/bin/env bash
# Run every test: GoogleTest (and the C++ example) through ctest, then pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cd "$here"
export PATH="$env/bin:$PATH"
export PYTHONPATH="$here/python:$here${PYTHONPATH:+:$PYTHONPATH}"  # $here: the benchmarks package
"$here/scripts/lint.sh"
ctest --test-dir build --output-on-failure -j "${EDKM_TEST_JOBS:-2}"
python -m pytest -q "$@"
# The C++ suite again under AddressSanitizer + UndefinedBehaviorSanitizer (a second, CPU-only
# build in build-asan/). EDKM_SKIP_SANITIZERS=1 skips it for quick local runs; CI runs it.
if [ -z "${EDKM_SKIP_SANITIZERS:-}" ]; then
  "$here/scripts/sanitize.sh"
fi
