# Sourced by scripts/build.sh and scripts/sanitize.sh: compile through sccache (pinned in
# requirements.txt) with its cache in ~/.cache/edkm/sccache, so a fresh clone (CI) reuses the
# objects of earlier builds instead of compiling everything again. SCCACHE_BASEDIRS strips this
# checkout's path from what sccache hashes, so clones in other directories hit the same entries.
# The server is restarted so that it runs with this checkout's settings. EDKM_NO_COMPILER_CACHE=1
# (or no sccache in the environment) builds without it.
if [ -z "${EDKM_NO_COMPILER_CACHE:-}" ] && [ -x "$env/bin/sccache" ]; then
  export SCCACHE_DIR="${SCCACHE_DIR:-${EDKM_CACHE:-$HOME/.cache/edkm}/sccache}"
  export SCCACHE_BASEDIRS="$here"
  export SCCACHE_IDLE_TIMEOUT="${SCCACHE_IDLE_TIMEOUT:-300}"
  "$env/bin/sccache" --stop-server >/dev/null 2>&1 || true
  if "$env/bin/sccache" --start-server >/dev/null 2>&1; then
    export EDKM_COMPILER_LAUNCHER="$env/bin/sccache"
  fi
fi
