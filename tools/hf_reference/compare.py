#!/usr/bin/env python3
"""Compare our logits (and greedy tokens) against a reference; exit 1 on mismatch.

    python compare.py --ours A.npy --ref B.npy [--ours-greedy ours.json --ref-greedy ref.json] [--max-rel 1e-4]

--ours / --ref: a .npy of shape [n_pos, V] or [n_seq, n_pos, V], or a folder written by
hf_forward.py / numpy_forward.py (logits.npy or logits_<i>.npy).

Definitions (per sequence, then the max / mean over all sequences):
  relative error of position p  = max_v |a[p,v] - b[p,v]| / max_v |b[p,v]|   (b = reference)
  "max relative error"          = the max of that over every position of every sequence
  Pearson correlation           = corr(a, b) over all flattened logits of the sequence
  top-1 agreement               = fraction of positions with argmax a == argmax b
                                  (near-ties, where the reference's top-2 gap is below
                                  --max-rel * max|b|, are counted separately, not excused)
  greedy                        = continuation token lists identical (first divergence shown)
  first pos > thr               = first position whose relative error exceeds --max-rel: BitLinear's
                                  int8 activation rounding turns a 1e-7 difference into a flipped
                                  integer now and then, and each flip grows through later layers and
                                  positions, so errors are tiny early and may jump later.
Exit status: 0 pass, 1 max relative error > --max-rel or greedy continuations differ, 2 bad input.
(--gate-quantile Q < 1 gates on the Q-quantile of the per-position errors instead of the max.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_io  # noqa: E402


def compare_sequence(a: np.ndarray, b: np.ndarray, max_rel: float) -> dict:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = np.maximum(np.abs(b64).max(axis=-1), 1e-30)
    rel = np.abs(a64 - b64).max(axis=-1) / denom
    am, bm = a64.ravel() - a64.mean(), b64.ravel() - b64.mean()
    pearson = float((am @ bm) / max(np.sqrt((am @ am) * (bm @ bm)), 1e-300))
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    agree = top_a == top_b
    top2 = np.sort(b64, axis=-1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) < max_rel * denom
    return {
        "n_pos": int(a.shape[0]),
        "max_rel": float(rel.max()),
        "mean_rel": float(rel.mean()),
        "worst_pos": int(rel.argmax()),
        "first_over": int(np.argmax(rel > max_rel)) if bool((rel > max_rel).any()) else None,
        "max_abs": float(np.abs(a64 - b64).max()),
        "pearson": pearson,
        "top1_agree": int(agree.sum()),
        "top1_disagree_near_tie": int((~agree & near_tie).sum()),
        "rel": rel,
    }


def first_divergence(x: list[int], y: list[int]) -> int | None:
    for i, (u, v) in enumerate(zip(x, y)):
        if u != v:
            return i
    return None if len(x) == len(y) else min(len(x), len(y))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", required=True, type=Path)
    p.add_argument("--ref", required=True, type=Path)
    p.add_argument("--ours-greedy", type=Path)
    p.add_argument("--ref-greedy", type=Path)
    p.add_argument("--max-rel", type=float, default=1e-4)
    p.add_argument("--gate-quantile", type=float, default=1.0,
                   help="gate on this quantile of the per-position relative errors instead of the max "
                        "(1.0 = max, the default; e.g. 0.95 tolerates int8-flip cascades in 5%% of positions)")
    args = p.parse_args()

    try:
        ours, ref = run_io.load_logits(args.ours), run_io.load_logits(args.ref)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(ours) != len(ref) or any(a.shape != b.shape for a, b in zip(ours, ref)):
        print(f"error: shape mismatch: ours {[a.shape for a in ours]} vs ref {[b.shape for b in ref]}",
              file=sys.stderr)
        return 2
    if (args.ours_greedy is None) != (args.ref_greedy is None):
        print("error: give both --ours-greedy and --ref-greedy, or neither", file=sys.stderr)
        return 2

    rows = [compare_sequence(a, b, args.max_rel) for a, b in zip(ours, ref)]
    greedy_rows: list[str] = []
    greedy_ok = True
    if args.ours_greedy is not None:
        g_ours, g_ref = run_io.read_greedy(args.ours_greedy), run_io.read_greedy(args.ref_greedy)
        if len(g_ours) != len(g_ref):
            print(f"error: {len(g_ours)} greedy sequences vs {len(g_ref)}", file=sys.stderr)
            return 2
        for x, y in zip(g_ours, g_ref):
            d = first_divergence(x, y)
            greedy_ok &= d is None
            greedy_rows.append("equal" if d is None else f"DIFFER at {d}")
    else:
        greedy_rows = ["-"] * len(rows)

    print("| seq | positions | max rel err | mean rel err | worst pos | first pos > thr | max abs err | pearson "
          "| top-1 agree | greedy |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, (r, g) in enumerate(zip(rows, greedy_rows)):
        tie = f" ({r['top1_disagree_near_tie']} near-tie)" if r["top1_disagree_near_tie"] else ""
        print(f"| {i} | {r['n_pos']} | {r['max_rel']:.3e} | {r['mean_rel']:.3e} | {r['worst_pos']} | "
              f"{'-' if r['first_over'] is None else r['first_over']} | "
              f"{r['max_abs']:.3e} | {r['pearson']:.8f} | {r['top1_agree']}/{r['n_pos']}{tie} | {g} |")
    n_pos = sum(r["n_pos"] for r in rows)
    max_rel = max(r["max_rel"] for r in rows)
    agree = sum(r["top1_agree"] for r in rows)
    all_rel = np.concatenate([r["rel"] for r in rows])
    gated = float(np.quantile(all_rel, args.gate_quantile)) if args.gate_quantile < 1.0 else max_rel
    ok = gated <= args.max_rel and greedy_ok
    print(f"| all | {n_pos} | {max_rel:.3e} | {sum(r['mean_rel'] * r['n_pos'] for r in rows) / n_pos:.3e} | | | "
          f"{max(r['max_abs'] for r in rows):.3e} | {min(r['pearson'] for r in rows):.8f} (min) | "
          f"{agree}/{n_pos} | {'equal' if greedy_ok else 'DIFFER'} |")
    print()
    print(f"positions over threshold: {int((all_rel > args.max_rel).sum())}/{all_rel.size}; "
          f"median relative error {float(np.median(all_rel)):.3e}")
    label = "max relative error" if args.gate_quantile >= 1.0 else f"q{args.gate_quantile:g} relative error"
    print(f"{label} {gated:.3e} (threshold {args.max_rel:.1e})"
          f"{'' if greedy_ok else ', greedy continuations differ'}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
