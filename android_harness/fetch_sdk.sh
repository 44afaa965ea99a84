#!/usr/bin/env bash
# The ExecuTorch SDK (include/, lib/, share/cmake/) of another platform's executorch wheel, the
# same version as the venv's, unpacked once into the prge cache; prints its folder.
#   android_harness/fetch_sdk.sh aarch64
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
ARCH=${1:-aarch64}
VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("executorch"))')
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')  # any cpXY wheel has the same SDK
CACHE=${PRGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/prge}
SDK=$CACHE/executorch-sdk/$VERSION-$ARCH/executorch
if [ ! -f "$SDK/share/cmake/executorch-config.cmake" ]; then
  mkdir -p "$CACHE/wheels"
  WHEEL=$(ls "$CACHE"/wheels/executorch-"$VERSION"-*manylinux*"$ARCH".whl 2>/dev/null | head -n1 || true)
  if [ -z "$WHEEL" ]; then
    "$PY" -m pip download --quiet "executorch==$VERSION" --platform "manylinux_2_28_$ARCH" \
      --only-binary=:all: --no-deps --python-version "$PYVER" -d "$CACHE/wheels" >&2
    WHEEL=$(ls "$CACHE"/wheels/executorch-"$VERSION"-*manylinux*"$ARCH".whl | head -n1)
  fi
  # Only the native SDK: the Python half of the wheel is of no use to a C++ build.
  "$PY" - "$WHEEL" "$(dirname "$SDK")" <<'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(("executorch/include/", "executorch/lib/", "executorch/share/"))]
    z.extractall(dest, names)
PYEOF
fi
echo "$SDK"
