#!/usr/bin/env bash
# Assemble a self-contained folder to copy to a device: the driver, every shared library it
# loads (for aarch64 also glibc's loader and libraries from the cross sysroot, so nothing comes
# from the device's system), the program, the data file and run.sh.
#   android_harness/make_bundle.sh --program DIR --data FILE --out BUNDLE [--arch aarch64|host]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCH=aarch64
while [ $# -gt 0 ]; do
  case "$1" in
    --program) PROGRAM=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --arch) ARCH=$2; shift 2 ;;
    *) echo "make_bundle.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
: "${PROGRAM:?--program DIR is required}" "${DATA:?--data FILE is required}" "${OUT:?--out DIR is required}"
[ -f "$PROGRAM/manifest.json" ] || { echo "make_bundle.sh: $PROGRAM/manifest.json not found" >&2; exit 2; }
[ -f "$DATA" ] || { echo "make_bundle.sh: $DATA not found" >&2; exit 2; }

BINARY=$("$ROOT/android_harness/build.sh" "$ARCH")
SDK=$(sed -n 's/^EXECUTORCH_ROOT:PATH=//p' "$(dirname "$BINARY")/CMakeCache.txt")  # the SDK it was built against
rm -rf "$OUT"
mkdir -p "$OUT/lib" "$OUT/program"
cp "$BINARY" "$OUT/prge-native"
cp "$SDK"/lib/libexecutorch*.so "$OUT/lib/"
for f in manifest.json model.pte model.ptd; do
  [ -f "$PROGRAM/$f" ] && cp "$PROGRAM/$f" "$OUT/program/"
done
cp "$DATA" "$OUT/data.bin"

if [ "$ARCH" = aarch64 ]; then
  # glibc from the cross toolchain: Android's bionic cannot load a glibc binary, but glibc's own
  # loader, started explicitly, can (the kernel is the same Linux arm64 ABI).
  SYSROOT=/usr/aarch64-linux-gnu/lib
  for f in ld-linux-aarch64.so.1 libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libstdc++.so.6 libgcc_s.so.1; do
    cp -L "$SYSROOT/$f" "$OUT/lib/"
  done
  LOADER='./lib/ld-linux-aarch64.so.1 --library-path ./lib'
else
  LOADER='env LD_LIBRARY_PATH=./lib'
fi
cat > "$OUT/run.sh" <<RUN
#!/bin/sh
# On the device: train with the bundle's own loader and libraries; results go to ./run/.
# PRGE_LAUNCHER (e.g. qemu-aarch64) lets a different machine run the bundle unchanged.
cd "\$(dirname "\$0")" || exit 2
exec \${PRGE_LAUNCHER:-} $LOADER ./prge-native --program program --data data.bin --out run "\$@"
RUN
chmod 755 "$OUT/run.sh" "$OUT/prge-native"
echo "$OUT"
