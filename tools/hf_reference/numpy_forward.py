#!/usr/bin/env python3
"""Independent BitNet b1.58 forward in pure numpy, written from FORMATS.md, no torch/transformers.

    python numpy_forward.py --model DIR --tokens FILE.json --out OUTDIR [--greedy N] [--dtype float32|float64]

Same outputs as hf_forward.py (see run_io.py). Math per BitLinear, float32 (default):
    s = 127 / max(max|x|, 1e-5)  (per token, f32; computed as (1/amax)*127 like torch, see act_scale)
    q = clamp(round_half_even(x * s), -128, 127)
    y = (q @ t^T) / s * weight_scale         (q @ t^T is exact in f32: |sum| < 2^24)
--dtype float64: everything in float64 except the quantizer, which is transformers' ActQuant in
float32 (x cast to f32, s = (1/amax)*127, q = round(x*s) clamped, x_q = q / s, back to f64), then
y = (x_q @ t^T) * weight_scale in f64; the counterpart of hf_forward_exact.py.
RMSNorm: x * 1/sqrt(mean(x^2) + eps) * w. RoPE rotate_half pairing (i, i + head_dim/2),
inv_freq = theta^(-2i/d). GQA: query head h uses kv head h // (heads / kv_heads).
Greedy decoding uses a KV cache (same math as a full pass) and argmax, no EOS stop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bitnet_hf_format as fmt  # noqa: E402
import run_io  # noqa: E402

F32 = np.float32
FT = np.float32  # working float type of everything but the quantizer; --dtype float64 changes it


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=FT)
    return (x * (FT(1.0) / np.sqrt(var + FT(eps)))).astype(FT) * w


# transformers computes `127 / amax` as torch's __rtruediv__, i.e. reciprocal(amax) * 127, which can
# differ from a correctly rounded division by one ulp and flip an int8 rounding. TRUE_DIV = False
# reproduces transformers bit for bit; --true-div switches to FORMATS.md's literal 127 / amax.
TRUE_DIV = False


def act_scale(amax: np.ndarray) -> np.ndarray:
    if TRUE_DIV:
        return F32(127.0) / amax
    return (F32(1.0) / amax) * F32(127.0)


def bitlinear(x: np.ndarray, t_transposed: np.ndarray, w_scale: float) -> np.ndarray:
    xf = x.astype(F32)
    amax = np.maximum(np.max(np.abs(xf), axis=-1, keepdims=True), F32(1e-5))
    s = act_scale(amax)
    q = np.clip(np.round(xf * s), -128, 127).astype(F32)
    if FT is np.float32:
        acc = q @ t_transposed  # exact integer sums
        return (acc / s * F32(w_scale)).astype(F32)
    x_q = (q / s).astype(FT)  # transformers' ActQuant output, float32 arithmetic
    return ((x_q @ t_transposed) * FT(w_scale)).astype(FT)


def relu2(x: np.ndarray) -> np.ndarray:
    r = np.maximum(x, FT(0))
    return r * r


class NumpyBitNet:
    def __init__(self, model_dir: Path):
        cfg, tensors = fmt.read_model_folder(model_dir)
        qc = cfg.get("quantization_config", {})
        if qc.get("linear_class") != "autobitlinear" or qc.get("quantization_mode") != "offline":
            raise ValueError(f"unsupported quantization_config {qc}: "
                             "weight_scale is a multiplier only for autobitlinear")
        if cfg.get("hidden_act") != "relu2" or not cfg.get("tie_word_embeddings", False):
            raise ValueError("expected hidden_act relu2 and tie_word_embeddings true")
        self.cfg = cfg
        self.n_layers = cfg["num_hidden_layers"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.head_dim = cfg["hidden_size"] // self.n_heads
        self.eps = float(cfg["rms_norm_eps"])
        theta = float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 500000.0)))
        # Same expression and precision as transformers: theta ** (arange(0, d, 2, f32) / d), in f32.
        exponent = np.arange(0, self.head_dim, 2, dtype=FT) / FT(self.head_dim)
        self.inv_freq = (FT(1.0) / np.power(FT(theta), exponent, dtype=FT)).astype(FT)
        self.embed = tensors["model.embed_tokens.weight"].astype(FT)
        self.final_norm = tensors["model.norm.weight"].astype(FT)
        self.layers = []
        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            entry = {norm: tensors[p + norm + ".weight"].astype(FT) for norm in fmt.LAYER_NORMS}
            for proj in fmt.PROJECTIONS:
                entry[proj] = (
                    np.ascontiguousarray(tensors[p + proj + ".weight"].astype(FT).T),
                    float(tensors[p + proj + ".weight_scale"][0]),
                )
            self.layers.append(entry)

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x: [n_heads, n_tok, head_dim]."""
        freqs = positions.astype(FT)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb).astype(FT), np.sin(emb).astype(FT)
        half = self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return (x * cos + rotated * sin).astype(FT)

    def new_cache(self) -> list[dict]:
        return [{"k": np.zeros((self.n_kv, 0, self.head_dim), FT), "v": np.zeros((self.n_kv, 0, self.head_dim), FT)}
                for _ in range(self.n_layers)]

    def forward(self, tokens: list[int], cache: list[dict]) -> np.ndarray:
        """Process new tokens after what cache holds; returns [n_new, vocab] f32 logits."""
        start = cache[0]["k"].shape[1]
        n = len(tokens)
        positions = np.arange(start, start + n)
        x = self.embed[np.asarray(tokens)].astype(FT)
        rep = self.n_heads // self.n_kv
        scale = FT(self.head_dim ** -0.5)
        for layer, c in zip(self.layers, cache):
            h = rms_norm(x, layer["input_layernorm"], self.eps)
            q = bitlinear(h, *layer["self_attn.q_proj"]).reshape(n, self.n_heads, self.head_dim).transpose(1, 0, 2)
            k = bitlinear(h, *layer["self_attn.k_proj"]).reshape(n, self.n_kv, self.head_dim).transpose(1, 0, 2)
            v = bitlinear(h, *layer["self_attn.v_proj"]).reshape(n, self.n_kv, self.head_dim).transpose(1, 0, 2)
            q, k = self.rope(q, positions), self.rope(k, positions)
            c["k"] = np.concatenate([c["k"], k], axis=1)
            c["v"] = np.concatenate([c["v"], v], axis=1)
            total = c["k"].shape[1]
            # Causal: new token i (absolute position start+i) sees keys 0..start+i.
            mask = np.arange(total)[None, :] > (start + np.arange(n))[:, None]
            attn = np.empty((self.n_heads, n, self.head_dim), FT)
            for head in range(self.n_heads):
                kv = head // rep
                scores = (q[head] @ c["k"][kv].T) * scale
                scores = np.where(mask, -np.inf, scores)
                scores = scores - scores.max(axis=-1, keepdims=True)
                p = np.exp(scores)
                p = (p / p.sum(axis=-1, keepdims=True)).astype(FT)
                attn[head] = p @ c["v"][kv]
            a = attn.transpose(1, 0, 2).reshape(n, self.n_heads * self.head_dim)
            a = rms_norm(a, layer["self_attn.attn_sub_norm"], self.eps)
            x = x + bitlinear(a, *layer["self_attn.o_proj"])
            z = rms_norm(x, layer["post_attention_layernorm"], self.eps)
            f = relu2(bitlinear(z, *layer["mlp.gate_proj"])) * bitlinear(z, *layer["mlp.up_proj"])
            f = rms_norm(f, layer["mlp.ffn_sub_norm"], self.eps)
            x = x + bitlinear(f, *layer["mlp.down_proj"])
        x = rms_norm(x, self.final_norm, self.eps)
        return (x @ self.embed.T).astype(FT)

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.forward(tokens, self.new_cache())

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        cache = self.new_cache()
        last = self.forward(tokens, cache)[-1]
        new = []
        for _ in range(n_new):
            nxt = int(np.argmax(last))
            new.append(nxt)
            if len(new) == n_new:
                break
            last = self.forward([nxt], cache)[-1]
        return new


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--tokens", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--greedy", type=int, default=0, metavar="N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--true-div", action="store_true",
                   help="activation scale as 127/amax (FORMATS.md, bitnet.cpp) instead of torch's (1/amax)*127")
    args = p.parse_args()
    global TRUE_DIV, FT
    TRUE_DIV = args.true_div
    FT = np.float64 if args.dtype == "float64" else np.float32

    seqs = run_io.read_tokens(args.tokens)
    t0 = time.time()
    model = NumpyBitNet(args.model)
    print(f"loaded {args.model} in {time.time() - t0:.1f}s")
    logits = [model.logits(s) for s in seqs]
    names = run_io.write_logits(args.out, logits)
    print(f"wrote {', '.join(names)} to {args.out}")
    if args.greedy > 0:
        run_io.write_greedy(args.out, [model.greedy(s, args.greedy) for s in seqs])
        print(f"wrote greedy.json ({args.greedy} tokens per sequence)")
    run_io.write_meta(args.out, {"producer": "numpy_forward.py", "model": str(args.model),
                                 "tokens": str(args.tokens), "greedy": args.greedy, "dtype": args.dtype,
                                 "true_div": args.true_div,
                                 "logits_files": names})
    return 0


if __name__ == "__main__":
    sys.exit(main())
