#!/usr/bin/env python3
"""Decode throughput of HF transformers' BitNetForCausalLM in bfloat16 on the GPU,
for comparison with `cargo xtask bench --device gpu` on the same model.

    python hf_bench.py --model DIR [--batches 1,8,32,128] [--prompt 128] [--gen 128] [--json OUT]

Same workload as our bench: B sequences of `prompt` token ids (the same
deterministic ids), then `gen` greedy tokens each. Prefill is timed with one
forward pass; decode as (generate(prompt, gen) - generate(prompt, 1)) / (gen - 1)
steps, with CUDA synchronisation, after a warm-up. Loads through hf_load (the
quantized AutoBitLinear path, every projection checked ternary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_load  # noqa: E402  (must come before torch)
import torch  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device for torch", file=sys.stderr)
        return 2
    model, info = hf_load.load_quantized_bitnet(args.model, args.dtype, "cuda", "sdpa")
    model.eval()
    vocab = model.config.vocab_size
    free0, total = torch.cuda.mem_get_info()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.tensor(
            [[(i * 7919 + b * 104729 + 13) % vocab for i in range(args.prompt)] for b in range(batch)],
            dtype=torch.long, device="cuda",
        )
        mask = torch.ones_like(ids)
        gen = lambda n: model.generate(  # noqa: E731
            input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )
        with torch.inference_mode():
            gen(4)  # warm-up
            _, prefill_s = timed(lambda: model(ids, attention_mask=mask))
            _, one = timed(lambda: gen(1))
            _, full = timed(lambda: gen(args.gen))
        step_s = (full - one) / (args.gen - 1)
        peak = torch.cuda.max_memory_allocated()
        row = {"batch": batch, "prefill_tok_per_s": batch * args.prompt / prefill_s,
               "decode_tok_per_s": batch / step_s, "ms_per_step": step_s * 1e3, "peak_allocated_bytes": peak}
        rows.append(row)
        print(f"batch {batch:>3}: decode {row['decode_tok_per_s']:.1f} tok/s ({row['ms_per_step']:.2f} ms/step), "
              f"prefill {row['prefill_tok_per_s']:.0f} tok/s, peak {peak / 1e9:.2f} GB", flush=True)
        torch.cuda.empty_cache()
    report = {"producer": "hf_bench.py", "model": str(args.model), "dtype": args.dtype,
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "prompt_tokens": args.prompt,
              "gen_tokens": args.gen, "free_memory_before": free0, "total_memory": total, "rows": rows, **info}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
