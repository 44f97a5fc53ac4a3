#!/usr/bin/env python3
"""Reference logits (and greedy continuations) of a BitNet folder, through HF transformers.

    python hf_forward.py --model DIR --tokens FILE.json --out OUTDIR \
        [--dtype float32|bfloat16] [--device cpu|cuda] [--greedy N] [--attn eager|sdpa]

Loads BitNetForCausalLM.from_pretrained(DIR) through the quantized autobitlinear/offline path,
asserts every projection really is an AutoBitLinear with ternary weights (exit 2 otherwise),
and writes the files described in run_io.py. torch.compile is disabled (eager math) unless
BITNET_REF_COMPILE=1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_load  # noqa: E402  (must come before torch)
import run_io  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--greedy", type=int, default=0, metavar="N", help="greedy continuation length (0 = none)")
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    args = p.parse_args()

    seqs = run_io.read_tokens(args.tokens)
    t0 = time.time()
    try:
        model, info = hf_load.load_quantized_bitnet(args.model, args.dtype, args.device, args.attn)
    except AssertionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"loaded {args.model} in {time.time() - t0:.1f}s: {info}")
    vocab = model.config.vocab_size
    for s in seqs:
        if max(s) >= vocab or min(s) < 0:
            print(f"error: token id out of range [0, {vocab})", file=sys.stderr)
            return 2

    logits = [hf_load.full_logits(model, s, args.device).cpu().numpy() for s in seqs]
    names = run_io.write_logits(args.out, logits)
    print(f"wrote {', '.join(names)} to {args.out} ({len(seqs)} sequences)")
    if args.greedy > 0:
        cont = [hf_load.greedy(model, s, args.greedy, args.device) for s in seqs]
        run_io.write_greedy(args.out, cont)
        print(f"wrote greedy.json ({args.greedy} tokens per sequence)")
    run_io.write_meta(
        args.out,
        {"producer": "hf_forward.py", "model": str(args.model), "tokens": str(args.tokens),
         "greedy": args.greedy, "logits_files": names, **info},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
