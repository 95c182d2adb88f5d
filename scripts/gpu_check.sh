#!/usr/bin/env bash
# The GPU check, for a machine with one NVIDIA GPU and torch installed (no internet, no pip
# index): build against the installed torch, run the C++ and Python tests (CUDA tests
# included), compute-sanitizer on a small dkm, the GPU benchmarks; logs and results go to
# $OUT (when set) and benchmarks/results/; a short table is printed last. Aim: < 8 minutes.
#   scripts/gpu_check.sh            (from the repository root)
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=$root/build-gpu/logs   # every step's log; $OUT gets results, summary and a tarball of these
rm -rf "$out"; mkdir -p "$out"
py=${PYTHON:-python3}
command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
jobs=$(nproc)
declare -A status
summary() {
  echo "=== gpu_check summary ($(sed -n 2p "$out/machine.txt"))"
  for s in build ctest pytest pytest_kernels crash_bt memcheck racecheck initcheck synccheck bench_dkm bench_gpu bench_lut profile demo; do
    [ -n "${status[$s]:-}" ] && printf '%-10s %s\n' "$s" "${status[$s]}"
  done
  grep -sE "passed|failed" "$out/pytest.log" | tail -1
  grep -sE "tests passed|tests failed" "$out/ctest.log" | tail -1
  grep -HE "ERROR SUMMARY|RACECHECK SUMMARY" "$out"/{memcheck,racecheck,initcheck,synccheck}.log 2>/dev/null
  grep -sE "^\| (dkm|reference) |ratio" "$out/bench_dkm.log"
  grep -sE "^\| [a-z_+]+ [0-9]+x|^\| (plain|dkm_linear|dkm\+linear) |^Layer|copy bandwidth" "$out/bench_gpu.log"
  grep -sE "^(== |wall|GPU kernel|per call)" "$out/profile.log"
  grep -sE "passed|failed" "$out/pytest_kernels.log" | tail -1
  grep -sE "weights in|Peak" "$out/demo.log"
}

# After every step: summary and logs to $OUT, so a run cut short still reports what it did.
publish() {
  summary > "$out/summary.txt"
  if [ -n "${OUT:-}" ]; then
    cp "$out/summary.txt" "$out/machine.txt" "$OUT/"
    cp "$root"/benchmarks/results/dkm_cuda_* "$root"/benchmarks/results/gpu_layer_* "$OUT/" 2>/dev/null
    tar czf "$OUT/gpu_check_logs.tgz" -C "$out" .
  fi
}

only=${GPU_CHECK_ONLY:-}   # e.g. "build pytest": run just these steps
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember pass/fail and seconds
  local name=$1; shift
  if [ -n "$only" ] && [[ " $only " != *" $name "* ]]; then return 0; fi
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  status[$name]="$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc") $((SECONDS - t0))s"
  tail -n 25 "$out/$name.log"
  publish
  return $rc
}

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])'
  nvcc --version | tail -1
} | tee "$out/machine.txt"

# Python packages the tests need and the machine may lack: wheels carried in .gpu_deps/wheels.
if ! $py -c 'import expecttest' 2>/dev/null && ls .gpu_deps/wheels/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps .gpu_deps/wheels/*.whl
fi

# The image's g++ (/opt/gcc wrapper) links libstdc++ statically into shared libraries; CMake
# links the shared libstdc++ explicitly (see CMakeLists.txt), checked after the build.
echo "compiler: ${CXX:-g++} ($(${CXX:-g++} --version | head -1))" | tee -a "$out/machine.txt"

gtest_src=""
[ -d .gpu_deps/googletest ] && gtest_src=$root/.gpu_deps/googletest
export EDKM_BUILD_DIR=$root/build-gpu/cmake EDKM_BUILD_TESTS=ON EDKM_BUILD_JOBS=$jobs
export EDKM_GTEST_SOURCE_DIR=$gtest_src
step build $py setup.py -q build_ext --inplace || { echo "build failed"; exit 1; }
if ! readelf -d python/edkm/lib/libedkm.so | grep NEEDED | grep -q 'libstdc++'; then
  status[build]+=" (WARNING: libstdc++ linked statically into libedkm; $(grep -m1 'edkm: libstdc++' "$out/build.log"))"
fi

export PYTHONPATH=$root/python
step ctest ctest --test-dir "$EDKM_BUILD_DIR" --output-on-failure -j 8
# pytest-xdist, where installed, runs the suite in parallel and survives a crashing test.
parallel=""
$py -c 'import xdist' 2>/dev/null && parallel="-n 8"
# Only the tests that need a GPU (marked `cuda` by tests/python/conftest.py): the other 540 run
# in CI and took over 5 minutes here on one process, past this script's budget.
# The kernels that are off by default because they had not run on a GPU when written (the
# CUDA U-domain kernels, the privatized slot atomics) get their own process: a fault there
# (CUDA errors are sticky) cannot fail the other tests.
unrun="tests/python/test_udomain_fused_cuda.py tests/python/test_slot_privatized_cuda.py tests/python/test_lut_linear.py"
step pytest $py -m pytest -q -p no:cacheprovider $parallel tests/python -m cuda -rs \
  $(printf -- '--ignore=%s ' $unrun)
step pytest_kernels $py -m pytest -q -p no:cacheprovider $unrun -rs
# A crash (segfault) gets a native backtrace from cuda-gdb (the machine has no gdb).
crashed=$(grep -soE "(worker '?[a-z0-9]+'? crashed while running|\[gw[0-9]+\] node down: ).*" "$out/pytest.log" \
          | grep -oE "tests/python/[^ ']+" | head -3)
if [ -n "$crashed" ] && command -v cuda-gdb >/dev/null; then
  for t in $crashed; do
    timeout 240 cuda-gdb -q -batch -ex run -ex bt --args $py -m pytest -q -p no:cacheprovider "$t" \
      >> "$out/crash_backtrace.log" 2>&1
  done
  status[crash_bt]="$(grep -c '^#' "$out/crash_backtrace.log") frames in crash_backtrace.log"
fi
# CUDA tests must have run, not skipped.
grep -sq "skipped.*no CUDA device" "$out/pytest.log" && status[pytest]+=" (CUDA tests SKIPPED)"

if command -v compute-sanitizer >/dev/null; then
  step memcheck timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 $py scripts/sanitize_dkm.py
  step racecheck timeout 150 compute-sanitizer --tool racecheck --error-exitcode 1 $py scripts/sanitize_dkm.py
  step initcheck timeout 150 compute-sanitizer --tool initcheck --error-exitcode 1 $py scripts/sanitize_dkm.py
  step synccheck timeout 150 compute-sanitizer --tool synccheck --error-exitcode 1 $py scripts/sanitize_dkm.py
fi

results=$root/benchmarks/results
step bench_dkm $py -m edkm bench dkm --device cuda --size 4096x4096 --repeats 10 --out "$results"
step bench_gpu $py -m edkm bench gpu --out "$results"
step bench_lut $py -m edkm bench lut --device cuda --repeats 20 --out "$results"
step profile $py scripts/profile_dkm.py
step demo $py -m edkm bench layer

echo
publish
cat "$out/summary.txt"
