#!/usr/bin/env bash
# Build the native driver; prints the binary's path on stdout (progress goes to stderr).
#   android_harness/build.sh          host build against the venv's executorch wheel -> build/native/
#   android_harness/build.sh aarch64  cross build (g++-aarch64-linux-gnu) against the manylinux
#                                     aarch64 wheel of the same version -> build/native-aarch64/
# Incremental: a second call only recompiles what changed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TARGET=${1:-host}
# One build of a target at a time: two builds sharing a cmake folder (two shells, parallel test
# workers) would corrupt it. The lock goes with this process, so a killed build never blocks.
mkdir -p "$ROOT/build"
exec 9>"$ROOT/build/.native-$TARGET.lock"
if command -v flock >/dev/null; then flock 9; fi
case "$TARGET" in
  host)
    SDK=$("$PY" -c 'import importlib.util as u; print(u.find_spec("executorch").submodule_search_locations[0])')
    BUILD=$ROOT/build/native
    EXTRA=()
    ;;
  aarch64)
    SDK=$("$ROOT/android_harness/fetch_sdk.sh" aarch64)
    BUILD=$ROOT/build/native-aarch64
    EXTRA=(-DCMAKE_TOOLCHAIN_FILE="$ROOT/android_harness/toolchain-aarch64.cmake")
    ;;
  *) echo "usage: $0 [host|aarch64]" >&2; exit 2 ;;
esac
cmake -S "$ROOT/android_harness" -B "$BUILD" -DEXECUTORCH_ROOT="$SDK" -DCMAKE_BUILD_TYPE=Release "${EXTRA[@]}" >&2
cmake --build "$BUILD" -j "$(nproc)" >&2
echo "$BUILD/prge-native"
