#!/usr/bin/env python3
"""HF transformers' BitNetForCausalLM run in float64 end to end: the "exact arithmetic" reference.

    python hf_forward_exact.py --model DIR --tokens FILE.json --out OUTDIR [--greedy N]

Why: BitLinear rounds `x * 127/max|x|` to integers, so two float32 implementations that differ
by one ulp anywhere upstream occasionally land on opposite sides of a .5 boundary, and the flip
cascades through later layers and positions (README.md, "Why the max is sometimes 1e-2").
A max-relative-error gate is therefore only meaningful when both sides compute with errors far
below the quantizer's resolution. This script loads the model with dtype=float64 and patches the
three places where transformers forces float32 regardless of the model dtype, so every step but
the quantizer runs in float64:

- BitNetRMSNorm.forward casts to float32 -> computed in the input dtype;
- BitNetRotaryEmbedding.forward computes inv_freq/cos/sin in float32 -> float64;
- eager_attention_forward takes softmax in float32 -> in the query dtype.

The quantizer itself (integrations/bitnet.py ActQuant: cast to float32, scale = 127/max, round,
clamp, divide) is NOT patched: its float32 arithmetic is part of the model's definition, and our
reference forward (crates/bitnet-inference/src/ops.rs) reproduces it exactly.
The math is unchanged; only rounding shrinks. Compare with compare.py as usual.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_load  # noqa: E402  (must come before torch)
import run_io  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.bitnet import modeling_bitnet as mb  # noqa: E402


def rms_norm_forward(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@torch.no_grad()
def rotary_forward(self, x, position_ids):
    base = self.config.rope_parameters["rope_theta"]
    dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
    freqs = position_ids[:, :, None].to(torch.float64) * inv_freq[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key_states = mb.repeat_kv(key, module.num_key_value_groups)
    value_states = mb.repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=query.dtype)
    attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def patch_float64() -> None:
    mb.BitNetRMSNorm.forward = rms_norm_forward
    mb.BitNetRotaryEmbedding.forward = rotary_forward
    mb.eager_attention_forward = eager_attention_forward


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--greedy", type=int, default=0, metavar="N")
    args = p.parse_args()

    patch_float64()
    seqs = run_io.read_tokens(args.tokens)
    t0 = time.time()
    try:
        model, info = hf_load.load_quantized_bitnet(args.model, "float64", "cpu", "eager")
    except AssertionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    assert next(model.parameters()).dtype == torch.float64
    print(f"loaded {args.model} in {time.time() - t0:.1f}s (float64, patched norm/rope/softmax): {info}")
    logits = [hf_load.full_logits(model, s, "cpu").cpu().numpy() for s in seqs]
    names = run_io.write_logits(args.out, logits)
    print(f"wrote {', '.join(names)} to {args.out} ({len(seqs)} sequences)")
    if args.greedy > 0:
        run_io.write_greedy(args.out, [hf_load.greedy(model, s, args.greedy, "cpu") for s in seqs])
        print(f"wrote greedy.json ({args.greedy} tokens per sequence)")
    run_io.write_meta(args.out, {"producer": "hf_forward_exact.py", "model": str(args.model), "greedy": args.greedy,
                                 "logits_files": names, **info, "dtype": "float64 (norm/rope/softmax patched)"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
