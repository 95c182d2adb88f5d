#!/usr/bin/env bash
# Create (once) and print the path of the project's Python environment.
# It lives outside the checkout, in a cache keyed by requirements.txt and the Python version,
# so a fresh clone (CI) reuses it and a changed requirements.txt gets a new one. The .ready
# marker is written last: an interrupted setup is thrown away and redone, never half-used.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${EDKM_CACHE:-$HOME/.cache/edkm}
py=${EDKM_PYTHON:-python3}
key=$(cat "$here/requirements.txt" "$here/requirements-nodeps.txt" | sha256sum | cut -c1-12)
tag=$($py -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
env="$cache/env-$tag-$key"
if [ ! -f "$env/.ready" ]; then
  echo "edkm: creating the Python environment in $env (once; torch brings several GB of CUDA libraries)" >&2
  rm -rf "$env"
  mkdir -p "$cache"
  $py -m venv "$env"
  "$env/bin/pip" install -q --upgrade pip >&2
  "$env/bin/pip" install -q -r "$here/requirements.txt" >&2
  "$env/bin/pip" install -q --no-deps -r "$here/requirements-nodeps.txt" >&2
  "$env/bin/python" -c 'import torch, pytest, tqdm, transformers, gguf, lm_eval' >&2
  touch "$env/.ready"
fi
echo "$env"
