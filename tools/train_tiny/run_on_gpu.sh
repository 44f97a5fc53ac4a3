#!/usr/bin/env bash
# corpus -> tokenizer -> QAT training -> HF export (+ reload check) -> held-out eval -> reference logits,
# end to end, in one call of at most ~9 minutes on one H200 (training itself: at most TOTAL_TRAIN_BUDGET
# seconds including its startup, 355 by default).
#
#   bash tools/train_tiny/run_on_gpu.sh [OUTDIR]        # OUTDIR defaults to $OUT, else ./train_tiny_out
#
# Environment knobs (defaults in brackets): N_TRAIN [1000000] corpus size, TRAIN_SECONDS [290] training
# loop budget, TOTAL_TRAIN_BUDGET [355] whole train.py budget, STEPS [30000] step cap, BATCH [256],
# SEQ [128], LR [3e-3], HIDDEN [384], INTERMEDIATE [1024], LAYERS [6], HEADS [6], KV_HEADS [3],
# SEED [1234] corpus seed, DEVICE [cuda], KEEP_TRAIN_JSONL [0].
# Results: OUTDIR/model (the HF folder), OUTDIR/summary.md (tables), OUTDIR/run.log, OUTDIR/ckpt,
# OUTDIR/reference (HF + numpy logits and greedy tokens of held-out prompts on the exported model).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REF="$HERE/../hf_reference"
OUTDIR="${1:-${OUT:-$PWD/train_tiny_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
exec > >(tee "$OUTDIR/run.log") 2>&1

PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

stamp "environment"
$PY - <<'EOF'
import sys, torch, transformers, tokenizers, numpy, safetensors
print(f"python {sys.version.split()[0]} torch {torch.__version__} transformers {transformers.__version__} "
      f"tokenizers {tokenizers.__version__} numpy {numpy.__version__} safetensors {safetensors.__version__}")
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

stamp "corpus"
$PY "$HERE/corpus.py" --out "$OUTDIR/data" --seed "${SEED:-1234}" --n-train "${N_TRAIN:-1000000}"

stamp "tokenizer"
$PY "$HERE/train_tokenizer.py" --data "$OUTDIR/data" --out "$OUTDIR/tokenizer"

stamp "train"
$PY "$HERE/train.py" --data "$OUTDIR/data" --tokenizer "$OUTDIR/tokenizer" --out "$OUTDIR/ckpt" \
    --device "$DEVICE" --steps "${STEPS:-30000}" --time-budget "${TRAIN_SECONDS:-290}" \
    --total-budget "${TOTAL_TRAIN_BUDGET:-355}" --batch "${BATCH:-256}" --seq "${SEQ:-128}" --lr "${LR:-3e-3}" \
    --hidden "${HIDDEN:-384}" --intermediate "${INTERMEDIATE:-1024}" --layers "${LAYERS:-6}" \
    --heads "${HEADS:-6}" --kv-heads "${KV_HEADS:-3}" --log-every 500

stamp "export + reload check"
$PY "$HERE/export_hf.py" --ckpt "$OUTDIR/ckpt" --tokenizer "$OUTDIR/tokenizer" --data "$OUTDIR/data" \
    --out "$OUTDIR/model" --device "$DEVICE" --tokens-out "$OUTDIR/reference_tokens.json" || echo "EXPORT CHECK FAILED"

stamp "eval (held-out, train) through transformers"
$PY "$HERE/eval_hf.py" --model "$OUTDIR/model" --data "$OUTDIR/data" --split heldout --device "$DEVICE" \
    --out "$OUTDIR/eval_heldout.json" | tee "$OUTDIR/eval_heldout.md"
$PY "$HERE/eval_hf.py" --model "$OUTDIR/model" --data "$OUTDIR/data" --split train --device "$DEVICE" \
    --out "$OUTDIR/eval_train.json" | tee "$OUTDIR/eval_train.md"

stamp "reference logits: transformers (float64 cpu, float32 cuda/cpu, bf16 cuda) vs independent numpy forward"
$PY "$REF/hf_forward.py" --model "$OUTDIR/model" --tokens "$OUTDIR/reference_tokens.json" \
    --out "$OUTDIR/reference/hf_f32_cuda" --device "$DEVICE" --greedy 16
$PY "$REF/hf_forward.py" --model "$OUTDIR/model" --tokens "$OUTDIR/reference_tokens.json" \
    --out "$OUTDIR/reference/hf_f32_cpu" --device cpu --greedy 16
$PY "$REF/hf_forward.py" --model "$OUTDIR/model" --tokens "$OUTDIR/reference_tokens.json" \
    --out "$OUTDIR/reference/hf_bf16_cuda" --device "$DEVICE" --dtype bfloat16 --greedy 16
$PY "$REF/numpy_forward.py" --model "$OUTDIR/model" --tokens "$OUTDIR/reference_tokens.json" \
    --out "$OUTDIR/reference/numpy_f32" --greedy 16
$PY "$REF/hf_forward_exact.py" --model "$OUTDIR/model" --tokens "$OUTDIR/reference_tokens.json" \
    --out "$OUTDIR/reference/hf_f64_cpu" --greedy 16
$PY "$REF/numpy_forward.py" --model "$OUTDIR/model" --tokens "$OUTDIR/reference_tokens.json" \
    --out "$OUTDIR/reference/numpy_f64" --greedy 16 --dtype float64
{
  echo "### numpy_forward float64 vs transformers float64 (exact arithmetic; quantizer float32 in both)"
  $PY "$REF/compare.py" --ours "$OUTDIR/reference/numpy_f64" --ref "$OUTDIR/reference/hf_f64_cpu" \
      --ours-greedy "$OUTDIR/reference/numpy_f64/greedy.json" --ref-greedy "$OUTDIR/reference/hf_f64_cpu/greedy.json" || true
  echo "### numpy_forward float32 vs transformers float32 cpu (int8 flips possible, see hf_reference/README.md)"
  $PY "$REF/compare.py" --ours "$OUTDIR/reference/numpy_f32" --ref "$OUTDIR/reference/hf_f32_cpu" \
      --ours-greedy "$OUTDIR/reference/numpy_f32/greedy.json" --ref-greedy "$OUTDIR/reference/hf_f32_cpu/greedy.json" || true
  echo "### transformers float32 cuda vs cpu"
  $PY "$REF/compare.py" --ours "$OUTDIR/reference/hf_f32_cuda" --ref "$OUTDIR/reference/hf_f32_cpu" \
      --ours-greedy "$OUTDIR/reference/hf_f32_cuda/greedy.json" --ref-greedy "$OUTDIR/reference/hf_f32_cpu/greedy.json" || true
  echo "### transformers bfloat16 cuda vs float32 cpu (informational: bf16 rounding, FAIL expected)"
  $PY "$REF/compare.py" --ours "$OUTDIR/reference/hf_bf16_cuda" --ref "$OUTDIR/reference/hf_f32_cpu" \
      --ours-greedy "$OUTDIR/reference/hf_bf16_cuda/greedy.json" --ref-greedy "$OUTDIR/reference/hf_f32_cpu/greedy.json" --max-rel 5e-2 || true
} | tee "$OUTDIR/reference/compare.md"

if [ "${KEEP_TRAIN_JSONL:-0}" != "1" ]; then
  rm -f "$OUTDIR/data/train.jsonl"   # large and reproducible: corpus.py --seed ${SEED:-1234} --n-train ${N_TRAIN:-1000000}
fi

stamp "summary"
{
  echo "# train_tiny run ($(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - T0 ))s)"
  echo
  $PY - "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
log = json.loads((out / "ckpt/train_log.json").read_text())
chk = json.loads((out / "model/export_check.json").read_text())["check"]
print(f"- steps {log['steps']} in {log['train_seconds']}s, {log['n_params'] / 1e6:.2f}M parameters, "
      f"{log['tokens_seen'] / 1e6:.1f}M tokens seen ({log['epochs']} epochs), final loss {log['final_loss']:.4f}")
print(f"- export check (QAT float32 vs reloaded HF float32): max relative error {chk['max_rel_error']:.3e}, "
      f"top-1 {chk['top1_agreement']:.4f}, greedy equal {chk['greedy_equal']}")
print(f"- train.py total {log['total_seconds']}s")
EOF
  echo
  echo "## held-out (transformers, float32)"
  grep '^|' "$OUTDIR/eval_heldout.md"
  echo
  echo "## train distribution (transformers, float32)"
  grep '^|' "$OUTDIR/eval_train.md"
  echo
  echo "## reference logits"
  cat "$OUTDIR/reference/compare.md"
} > "$OUTDIR/summary.md"
cat "$OUTDIR/summary.md"
stamp "done"
