#!/usr/bin/env bash
# Our reference forward pass against HF transformers' BitNetForCausalLM, on a synthetic model
# exported in the microsoft/bitnet-b1.58-2B-4T HF layout (docs/hf-crosscheck.md).
#
#   bash tools/hf_reference/crosscheck.sh [PRESET] [OUTDIR]      # PRESET: tiny | small (default small)
#
# Needs python3 with torch + transformers (+ numpy). XTASK may name a prebuilt xtask binary
# (e.g. on the GPU machine, which has no cargo); otherwise it is built with cargo.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PRESET="${1:-small}"
OUTDIR="${2:-/tmp/bitnet-crosscheck-$PRESET}"
mkdir -p "$OUTDIR"
if [ -z "${XTASK:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p xtask)
  XTASK="$ROOT/target/release/xtask"
fi
cd "$ROOT"
"$XTASK" gen-model --preset "$PRESET" --seed 42 --format hf --out "$OUTDIR/model"
"$XTASK" logits --model "$OUTDIR/model" --prompts tests/data/crossval_prompts.txt --positions 64 --greedy 32 --out "$OUTDIR/ours"
python3 "$HERE/hf_forward_exact.py" --model "$OUTDIR/model" --tokens "$OUTDIR/ours/tokens.json" --greedy 32 --out "$OUTDIR/hf64"
python3 "$HERE/hf_forward.py" --model "$OUTDIR/model" --tokens "$OUTDIR/ours/tokens.json" --greedy 32 --dtype float32 --out "$OUTDIR/hf32"
status=0
echo "## ours (reference forward) vs HF transformers, float64 (norm/rope/softmax patched to float64)"
python3 "$HERE/compare.py" --ours "$OUTDIR/ours/logits.npy" --ref "$OUTDIR/hf64/logits.npy" \
  --ours-greedy "$OUTDIR/ours/greedy.json" --ref-greedy "$OUTDIR/hf64/greedy.json" --max-rel 1e-4 || status=1
echo "## ours vs HF transformers, float32 (informational: see docs/hf-crosscheck.md)"
python3 "$HERE/compare.py" --ours "$OUTDIR/ours/logits.npy" --ref "$OUTDIR/hf32/logits.npy" \
  --ours-greedy "$OUTDIR/ours/greedy.json" --ref-greedy "$OUTDIR/hf32/greedy.json" --max-rel 1e-4 || true
echo "## HF float32 vs HF float64 (how far transformers' own float32 run is from exact)"
python3 "$HERE/compare.py" --ours "$OUTDIR/hf32/logits.npy" --ref "$OUTDIR/hf64/logits.npy" \
  --ours-greedy "$OUTDIR/hf32/greedy.json" --ref-greedy "$OUTDIR/hf64/greedy.json" --max-rel 1e-4 || true
exit $status
