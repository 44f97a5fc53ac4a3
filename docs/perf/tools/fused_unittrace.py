#!/usr/bin/env python3
"""Per-unit breakdown of the fused decode kernel's tensor-core attention stage.

Build with BITNET_CUDA_DEFINES=FUSED_SUBTRACE=1,FUSED_UNITTRACE=1, run e.g.
  BITNET_CUDA_FUSED_TRACE=1 BITNET_CUDA_FUSED_TRACE_DUMP=dump.txt \\
    xtask bench --device gpu --batches 1 --precisions bf16
and pass the dump (one u64 per line: the last launch's trace buffer) and the
model's layer count. Every unit of the first quarters of the CTAs (all of them
at batch 1) records clock64 at its points and globaltimer at its start and end
(kernels/bitnet.cu, FUSED_UNITTRACE). Prints, per unit, means over the layers:
when it started and ended after the stage's first unit started (us, from the
global timer), the time between its consecutive points (us, from its SM's
clock), its CTA and whether it covers the new position, writes k and v and
combined its head; then the same means by kind of unit.
"""
import sys

from fused_subtrace import load_dump

POINTS = ["rotated", "q built", "positions", "merged", "part", "fence", "counter", "end"]
UNITS = 128


def main():
    v, layers, sub, ghz, _ = load_dump("fused_unittrace.py", "unit trace", lambda layers: 12 * UNITS * layers)
    base = sub + 60 * layers + 4
    units = {}
    for l in range(layers):
        rows = [v[base + 12 * (l * UNITS + u):base + 12 * (l * UNITS + u) + 12] for u in range(UNITS)]
        live = [(u, r) for u, r in enumerate(rows) if r[9]]
        if not live:
            continue
        first = min(r[9] for _, r in live)
        for u, r in live:
            end = r[10] & ((1 << 63) - 1)
            d = units.setdefault(u, {"n": 0, "start": 0.0, "end": 0.0, "steps": [0.0] * 8, "steps_n": [0] * 8,
                                     "cta": r[11] & 0xffff, "covers": 0, "writer": 0, "combined": 0})
            d["n"] += 1
            d["start"] += (r[9] - first) / 1e3
            d["end"] += (end - first) / 1e3
            d["covers"] += (r[11] >> 16) & 1
            d["writer"] += (r[11] >> 17) & 1
            d["combined"] += r[10] >> 63
            prev = r[0]
            for i in range(1, 9):
                if r[i] and prev:
                    d["steps"][i - 1] += (r[i] - prev) / ghz / 1e3
                    d["steps_n"][i - 1] += 1
                    prev = r[i]
    if not units:
        sys.exit("no unit entries in the dump (was the kernel built with FUSED_UNITTRACE 1?)")
    print(f"SM clock {ghz:.3f} GHz; {len(units)} units; means over the layers (us)")
    print("unit  cta  start    end  cover writer comb  " + " ".join(f"{p:>9}" for p in POINTS))
    for u, d in sorted(units.items(), key=lambda kv: kv[1]["end"] / kv[1]["n"]):
        n = d["n"]
        steps = " ".join(f"{(s / k if k else 0):9.2f}" for s, k in zip(d["steps"], d["steps_n"]))
        print(f"{u:4d} {d['cta']:4d} {d['start'] / n:6.2f} {d['end'] / n:6.2f}  {d['covers'] / n:5.2f} "
              f"{d['writer'] / n:6.2f} {d['combined'] / n:4.2f}  {steps}")
    groups = {}
    for d in units.values():
        n = d["n"]
        key = ("writer" if d["writer"] / n > 0.5 else "covers" if d["covers"] / n > 0.5 else "other") + \
              (", combined" if d["combined"] / n > 0.5 else "")
        g = groups.setdefault(key, [0, 0.0, 0.0])
        g[0] += 1
        g[1] += d["start"] / n
        g[2] += d["end"] / n
    for key, (k, s, e) in sorted(groups.items()):
        print(f"{key}: {k} units, start {s / k:.2f}, end {e / k:.2f}")
    means = []
    for i, p in enumerate(POINTS):
        vals = [d["steps"][i] / d["steps_n"][i] for d in units.values() if d["steps_n"][i]]
        means.append(f"{p} {sum(vals) / len(vals):.2f}" if vals else f"{p} -")
    ends = [d["end"] / d["n"] for d in units.values()]
    print(f"all units, mean steps: " + " | ".join(means) + f"; end mean {sum(ends) / len(ends):.2f}, last {max(ends):.2f}")


if __name__ == "__main__":
    main()
