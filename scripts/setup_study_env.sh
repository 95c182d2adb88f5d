#!/usr/bin/env bash
# Create (once) and print the folder of the study's extra packages (requirements-study.txt):
# llama.cpp's quantizer through llama-cpp-python (built from source) and HQQ. Like setup_env.sh
# it lives in the cache outside the checkout, keyed by the requirement lines and the Python
# version, and the .ready marker is written last, so an interrupted build is redone, never half-used.
# Only `edkm bench study` needs it (it adds the folder to sys.path itself).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cache=${EDKM_CACHE:-$HOME/.cache/edkm}
key=$(grep -v '^#' "$here/requirements-study.txt" | sha256sum | cut -c1-12)
tag=$("$env/bin/python" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
dir="$cache/study-extras-$tag-$key"
if [ ! -f "$dir/.ready" ]; then
  echo "edkm: building the study's extra packages in $dir (once; llama.cpp compiles for a few minutes)" >&2
  rm -rf "$dir"
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_CURL=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF}" \
    "$env/bin/pip" install -q --no-deps --target "$dir" -r "$here/requirements-study.txt" >&2
  PYTHONPATH="$dir" "$env/bin/python" -c 'import llama_cpp, hqq.core.quantize' >&2
  touch "$dir/.ready"
fi
echo "$dir"
