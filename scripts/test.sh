#!/usr/bin/env bash
# Run every test: GoogleTest (and the C++ example) through ctest, then pytest.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cd "$here"
export PATH="$env/bin:$PATH"
export PYTHONPATH="$here/python${PYTHONPATH:+:$PYTHONPATH}"
ctest --test-dir build --output-on-failure -j "${EDKM_TEST_JOBS:-2}"
python -m pytest -q "$@"
