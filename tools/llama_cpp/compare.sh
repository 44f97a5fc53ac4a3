#!/usr/bin/env bash
# llama.cpp's CPU decode and prefill against ours, on one file, on this machine.
#
#   bash tools/llama_cpp/compare.sh [THREADS...]      (default: 2 1)
#
# Environment: WORK (default /tmp/bitnet-llama-cpp), ROUNDS (2), XTASK (an
# xtask binary, e.g. a GPU bundle's), DEBS (a folder of the .deb files, for a
# machine without network access).
#
# Upstream llama.cpp reads neither bitnet.cpp's I2_S nor the `bitnet-b1.58`
# architecture, so the 2b4t preset is written as `cargo xtask gen-model
# --ternary tq2_0 --arch bitnet` (TQ2_0 blocks of scale 1, the exact tensor
# scales in `<proj>.scale` tensors), which both engines load. llama.cpp comes
# from Debian's package (sid: llama.cpp-tools 0.7.0, ggml 0.27.0, built for
# glibc 2.43), extracted with its own glibc under $WORK, never installed.
# Each round runs llama-bench (pp128 and tg128 at depth 128: decode of
# positions 128-255), then `xtask bench` with its f32 KV cache and with
# --kv-cache f16 (llama.cpp's default KV type); rounds alternate, because a
# shared machine's speed moves between minutes.
#
# Caveat: llama.cpp's `bitnet` graph applies SiLU in the FFN (2B-4T uses
# relu^2; upstream PR 26751, which would read it from the file, was closed),
# so its tokens are wrong for this model; the work per token is the same.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${WORK:-/tmp/bitnet-llama-cpp}
ROUNDS=${ROUNDS:-2}
if [ $# -gt 0 ]; then THREADS=("$@"); else THREADS=(2 1); fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PKGS="llama.cpp-tools libllama0 libggml0 libc6 libstdc++6 libgcc-s1 libgomp1 libssl3t64 zlib1g libzstd1"
mkdir -p "$WORK/debs" "$WORK/out"
L=$WORK/root/usr/lib/x86_64-linux-gnu
# A machine without network access (the GPU machine) takes the packages
# from DEBS, a folder of the .deb files this script downloaded elsewhere
# ($WORK/debs).
extract() {
    if command -v dpkg-deb >/dev/null; then
        dpkg-deb -x "$1" "$WORK/root"
    else
        ar p "$1" "$(ar t "$1" | grep '^data.tar')" | tar -xJ -C "$WORK/root"
    fi
}
if [ ! -x "$WORK/root/usr/bin/llama-bench" ]; then
    mkdir -p "$WORK/root"
    if [ -n "${DEBS:-}" ]; then
        for deb in "$DEBS"/*.deb; do extract "$deb"; done
    else
        curl -sf "$MIRROR/dists/sid/main/binary-amd64/Packages.xz" | xz -dc >"$WORK/Packages"
        for p in $PKGS; do
            f=$(awk -v P="$p" '$0 == "Package: " P { f = 1 } f && /^Filename:/ { print $2; exit }' "$WORK/Packages")
            [ -n "$f" ] || { echo "package $p not found in sid" >&2; exit 1; }
            curl -sf -o "$WORK/debs/$(basename "$f")" "$MIRROR/$f"
            extract "$WORK/debs/$(basename "$f")"
        done
    fi
fi
# ggml looks for its CPU variants (one per instruction set; it loads the best
# this CPU runs) only under /usr/lib/x86_64-linux-gnu/ggml.
if [ ! -e /usr/lib/x86_64-linux-gnu/ggml ]; then
    ln -s "$L/ggml" /usr/lib/x86_64-linux-gnu/ggml
fi
llama() {
    local bin=$1
    shift
    "$L/ld-linux-x86-64.so.2" --library-path "$L:$L/llama" "$WORK/root/usr/bin/$bin" "$@"
}
XTASK=${XTASK:-$ROOT/target/release/xtask}
[ -x "$XTASK" ] || (cd "$ROOT" && cargo build --release -q -p xtask)
MODEL=$WORK/2b4t-tq2_0.gguf
[ -f "$MODEL" ] || "$XTASK" gen-model --preset 2b4t --ternary tq2_0 --arch bitnet --out "$MODEL"
for round in $(seq 1 "$ROUNDS"); do
    for t in "${THREADS[@]}"; do
        llama llama-bench -m "$MODEL" -p 128 -n 128 -d 128 -t "$t" -r 2 -o json \
            >"$WORK/out/llama-t$t-$round.json" 2>"$WORK/out/llama-t$t-$round.err"
        "$XTASK" bench --model "$MODEL" --threads "$t" --pairs 0 --json "$WORK/out/ours-t$t-$round.json" \
            >"$WORK/out/ours-t$t-$round.log" 2>&1
        "$XTASK" bench --model "$MODEL" --threads "$t" --pairs 0 --kv-cache f16 \
            --json "$WORK/out/ours-f16kv-t$t-$round.json" >"$WORK/out/ours-f16kv-t$t-$round.log" 2>&1
    done
done
python3 "$ROOT/tools/llama_cpp/summary.py" "$WORK/out"
