#!/usr/bin/env bash
# Lint and format checks (run first by scripts/test.sh, so `make test` and CI fail on them):
# ruff check and ruff format --check over the Python code, clang-format --dry-run over the C++
# and CUDA sources (.clang-format). `scripts/lint.sh --fix` rewrites the files instead.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cd "$here"
py=(python tests benchmarks scripts examples)
mapfile -t cpp < <(git ls-files '*.cpp' '*.h' '*.cu' '*.cuh' | grep -v '^build')
if [ "${1:-}" = "--fix" ]; then
  "$env/bin/ruff" check --fix "${py[@]}"
  "$env/bin/ruff" format "${py[@]}"
  "$env/bin/clang-format" -i "${cpp[@]}"
  exit 0
fi
status=0
"$env/bin/ruff" check --quiet "${py[@]}" || status=1
"$env/bin/ruff" format --check --quiet "${py[@]}" || { echo "edkm: ruff format would change the files above (scripts/lint.sh --fix)" >&2; status=1; }
"$env/bin/clang-format" --dry-run --Werror "${cpp[@]}" || { echo "edkm: clang-format would change the C++ above (scripts/lint.sh --fix)" >&2; status=1; }
if [ "$status" != 0 ]; then
  echo "edkm: lint failed" >&2
fi
exit $status
