#!/usr/bin/env bash
# Push a bundle (make_bundle.sh) to a phone over adb, train there, pull metrics and adapter back.
#   android_harness/adb_run.sh BUNDLE [prge-native options, e.g. --steps 20 --eval-every 10]
# Results land in BUNDLE/pulled/run/ (metrics.jsonl, adapter.safetensors, summary.json, ckpt/).
# ADB (default adb) and PRGE_DEVICE_DIR (default /data/local/tmp/prge) can be overridden.
set -euo pipefail
BUNDLE=${1:?usage: adb_run.sh BUNDLE [prge-native options]}
shift
ADB=${ADB:-adb}
DEST=${PRGE_DEVICE_DIR:-/data/local/tmp/prge}
[ -x "$BUNDLE/run.sh" ] || { echo "adb_run.sh: $BUNDLE/run.sh not found (make_bundle.sh builds it)" >&2; exit 2; }
ARGS=""
for a in "$@"; do ARGS="$ARGS '$a'"; done
$ADB shell "rm -rf '$DEST' && mkdir -p '$DEST'"
$ADB push "$BUNDLE/." "$DEST/"
# adb push keeps no execute bits on some devices
$ADB shell "chmod 755 '$DEST/run.sh' '$DEST/prge-native' '$DEST'/lib/ld-linux-aarch64.so.1 2>/dev/null; sh '$DEST/run.sh' $ARGS"
rm -rf "$BUNDLE/pulled"
mkdir -p "$BUNDLE/pulled"
$ADB pull "$DEST/run" "$BUNDLE/pulled/"
echo "$BUNDLE/pulled/run"
