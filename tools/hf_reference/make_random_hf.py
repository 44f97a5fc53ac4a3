#!/usr/bin/env python3
"""Write a small random BitNet b1.58 model folder in the microsoft/bitnet-b1.58-2B-4T layout.

Used to test hf_forward.py / numpy_forward.py / compare.py without the Rust writer.
numpy only: random ternary weights (about 1/3 zeros), bf16 scales near 1.5, bf16 norms
near 1, bf16 embeddings. No tokenizer is written (from_pretrained of the model alone
does not need one). input_layernorm weights are scaled down so attention is well conditioned
(see the comment in main); all other norms are near 1, so relu2 activations are large
(exercises f16 overflow handling).

    python make_random_hf.py --out /tmp/rand_bitnet [--seed 0] [--hidden 256 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bitnet_hf_format as fmt  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=640)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-pos", type=int, default=512)
    # A non-default theta so a reader that ignores rope_theta is caught.
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--attn-norm-level", type=float, default=0.0,
                   help="mean input_layernorm weight (0 = 1/sqrt(2H/3), which keeps attention well conditioned)")
    p.add_argument("--tokens", type=Path, help="also write a random tokens JSON file here")
    p.add_argument("--n-seq", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=24)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    config = fmt.make_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_pos,
        rope_theta=args.rope_theta,
        bos_token_id=1,
        eos_token_id=2,
    )
    shapes = fmt.projection_shapes(config)

    def ternary(shape):
        # P(0) = 1/3, P(+-1) = 1/3 each.
        return rng.integers(-1, 2, size=shape, dtype=np.int8)

    # Norm weights are near 1, except input_layernorm: with ternary weights and scales near 1.5, q and k
    # elements would be about 1.5 * sqrt(2H/3) (~20 at H=256) and attention scores in the hundreds, so
    # the softmax turns into a hard argmax and a one-ulp difference anywhere flips whole rows (the model
    # is chaotic and no two correct implementations agree). BitLinear is scale-invariant in its input,
    # so scaling input_layernorm by 1/sqrt(2H/3) brings q, k to about 1.5 and scores to O(1), as in a
    # trained model (microsoft's 2B-4T has input_layernorm weights around 0.02).
    attn_norm_level = args.attn_norm_level or 1.0 / np.sqrt(2.0 * args.hidden / 3.0)
    layers, scales, terns = [], [], []
    for _ in range(args.layers):
        entry = {}
        for norm in fmt.LAYER_NORMS:
            level = attn_norm_level if norm == "input_layernorm" else 1.0
            width = fmt.norm_width(config, norm)
            entry[norm] = (level * (1.0 + 0.1 * rng.standard_normal(width))).astype(np.float32)
        layers.append(entry)
        terns.append({proj: ternary(shapes[proj]) for proj in fmt.PROJECTIONS})
        scales.append({proj: float(1.5 + 0.2 * rng.standard_normal()) for proj in fmt.PROJECTIONS})
    # Embedding rows of norm ~1: the logits stay O(1)-O(10) so relative errors mean something.
    embed = (rng.standard_normal((args.vocab, args.hidden)) / np.sqrt(args.hidden) * 4).astype(np.float32)
    final_norm = (1.0 + 0.1 * rng.standard_normal(args.hidden)).astype(np.float32)

    fmt.write_model_folder(
        args.out, config, embed=embed, final_norm=final_norm, layers=layers, scales=scales, ternary=terns
    )
    print(f"wrote {args.out}/config.json and model.safetensors "
          f"(H={args.hidden} I={args.intermediate} L={args.layers} heads={args.heads}/{args.kv_heads} V={args.vocab})")

    if args.tokens:
        seqs = [[1] + rng.integers(3, args.vocab, size=args.seq_len - 1).tolist() for _ in range(args.n_seq)]
        args.tokens.write_text(json.dumps({"sequences": seqs}) + "\n")
        print(f"wrote {args.tokens} ({args.n_seq} sequences of {args.seq_len} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
