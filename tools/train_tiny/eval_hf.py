#!/usr/bin/env python3
"""Exact-match accuracy per task of an exported model, greedy decoding through HF transformers.

    python eval_hf.py --model MODEL_DIR --split heldout|train [--data DATA_DIR] \
        [--format raw|chat|both] [--dtype float32|bfloat16] [--device cpu|cuda] [--out FILE.json]

Loads MODEL_DIR with BitNetForCausalLM.from_pretrained through the quantized offline path (asserted),
encodes prompts with MODEL_DIR/tokenizer.json exactly as in training (raw: <bos>prompt; chat:
<bos>User: prompt<eot>Assistant: ), decodes greedily with the KV cache until <|end_of_text|> or
<|eot_id|>, and counts a hit when the decoded text before the stop token equals the expected
answer exactly. --split heldout uses DATA_DIR/heldout.jsonl, train uses train_eval.jsonl.
Prints a markdown table; writes accuracies and the first samples to --out
(default MODEL_DIR/eval_<split>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_common as tc  # noqa: E402  (sets TORCHDYNAMO_DISABLE before torch)
import torch  # noqa: E402

import corpus  # noqa: E402
import hf_load  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", type=Path, help="corpus folder (default: MODEL_DIR/../data, run_on_gpu.sh's layout)")
    ap.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ap.add_argument("--format", default="both", choices=["raw", "chat", "both"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.data is None:
        args.data = args.model.resolve().parent / "data"
        if not (args.data / "heldout.jsonl").exists():
            ap.error(f"--data not given and {args.data}/heldout.jsonl does not exist")

    t0 = time.time()
    model, info = hf_load.load_quantized_bitnet(args.model, args.dtype, args.device, "sdpa")
    enc = tc.Encoder(args.model)
    items = corpus.read_jsonl(args.data / ("heldout.jsonl" if args.split == "heldout" else "train_eval.jsonl"))
    fmts = ["raw", "chat"] if args.format == "both" else [args.format]
    results = [tc.exact_match_eval(model, enc, items, f, args.device, args.batch) for f in fmts]
    print(f"{args.model} ({args.split}, {len(items)} items, transformers {info['transformers']}, "
          f"{args.dtype} on {args.device}, {time.time() - t0:.1f}s):")
    print(tc.accuracy_table(results))
    out = args.out or args.model / f"eval_{args.split}.json"
    out.write_text(json.dumps({"model": str(args.model), "split": args.split, "dtype": args.dtype,
                               "device": args.device, "load": info,
                               "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
