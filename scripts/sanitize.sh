#!/usr/bin/env bash
# Build libedkm (CPU) and the GoogleTest suite with AddressSanitizer and UndefinedBehaviorSanitizer
# in build-asan/ and run the suite. LibTorch itself is not instrumented: ASan checks our code's
# memory accesses (and whatever it hands to LibTorch), UBSan our code's arithmetic and casts.
# Leak checking is off because LibTorch keeps process-lifetime allocations; container-overflow
# checks are off because LibTorch's (uninstrumented) std::vectors cross into our code.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
env=$("$here/scripts/setup_env.sh")
cd "$here"
. "$here/scripts/compiler_cache.sh"
launcher=()
if [ -n "${EDKM_COMPILER_LAUNCHER:-}" ]; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER="$EDKM_COMPILER_LAUNCHER")
fi
prefix=$("$env/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
mkdir -p build-asan
echo "edkm: building with ASan+UBSan (log: build-asan/build.log)" >&2
if ! { cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEDKM_WITH_CUDA=OFF \
         -DEDKM_BUILD_PYTHON=OFF -DEDKM_BUILD_TESTS=ON -DCMAKE_PREFIX_PATH="$prefix" "${launcher[@]}" \
         -DCMAKE_CXX_FLAGS="$san" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
         -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
       && cmake --build build-asan -j "${EDKM_BUILD_JOBS:-$(nproc)}" --target edkm_tests; } \
     > build-asan/build.log 2>&1; then
  grep -E "error" -A3 build-asan/build.log | head -40 >&2 || true
  tail -n 20 build-asan/build.log >&2
  echo "edkm: sanitizer build failed (build-asan/build.log)" >&2
  exit 1
fi
export ASAN_OPTIONS="detect_leaks=0:detect_container_overflow=0:abort_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
ctest --test-dir build-asan --output-on-failure -j "${EDKM_TEST_JOBS:-2}" -E example_find_package
