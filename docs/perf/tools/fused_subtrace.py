#!/usr/bin/env python3
"""Per-stage breakdown of the fused decode kernel from a sub-stage trace.

Build with `#define FUSED_SUBTRACE 1` in kernels/bitnet.cu (or run with
BITNET_CUDA_DEFINES=FUSED_SUBTRACE=1; add FUSED_SUBTRACE_LAST=1 to trace the
last CTA, which holds attention unit 0 at batch 1, instead of CTA 0), then run e.g.
  BITNET_CUDA_FUSED_TRACE=1 BITNET_CUDA_FUSED_TRACE_DUMP=dump.txt \\
    xtask bench --device gpu --batches 1 --precisions bf16
and pass the dump (one u64 per line: the last launch's trace buffer) and the
model's layer count. Prints, per stage, the mean over the layers of the time
between consecutive recorded points of CTA 0 (us, from clock64 and the SM clock rate
measured over the launch).
"""
import sys

NAMES = ["start", "prefetch", "loaded", "sumsq", "amax", "qsum", "norm end", "products", "reduced",
         "written", "weights staged", "barrier left"]
# The attention stage's points (its first unit in the traced CTA; 2 and 4 only on
# tensor cores, 8 only where this unit combined).
ATT_NAMES = ["start", "q/k/v rotated", "q built (tensor cores)", "positions done", "warps merged (tensor cores)",
             "part written", "fence", "counter", "combined", "", "stage end", "barrier left"]
STAGES = ["A q|k|v", "C attention", "D o", "E gate/up", "F down"]


def load_dump(tool, what, extra):
    """The dump named on the command line (DUMP N_LAYERS), checked to hold the
    sub-stage clocks and `extra(layers)` more entries: returns the entries,
    the layer count, the index of the sub-stage clocks, the SM clock (GHz)
    and the launch's length (us). Shared with fused_unittrace.py."""
    if len(sys.argv) != 3:
        sys.exit(f"usage: {tool} DUMP N_LAYERS")
    v = [int(x) for x in open(sys.argv[1]).read().split()]
    layers = int(sys.argv[2])
    base = 1 + 19 * layers
    need = base + 60 * layers + 4 + extra(layers)
    if len(v) < need:
        sys.exit(f"{sys.argv[1]}: {len(v)} entries, a {layers}-layer {what} has {need}")
    t0, c0, t1, c1 = v[base + 60 * layers:base + 60 * layers + 4]
    if t1 <= t0 or c1 <= c0:
        sys.exit("no sub-stage clocks in the dump (was the kernel built with FUSED_SUBTRACE 1?)")
    return v, layers, base, (c1 - c0) / (t1 - t0), (t1 - t0) / 1e3


def main():
    v, layers, base, ghz, launch_us = load_dump("fused_subtrace.py", "sub-stage trace", lambda layers: 0)
    sub = v[base:base + 60 * layers]
    print(f"SM clock {ghz:.3f} GHz, launch {launch_us:.1f} us")
    for s, name in enumerate(STAGES):
        names = ATT_NAMES if s == 1 else NAMES
        parts, total = [], 0.0
        for i in range(1, 12):
            d = []
            for l in range(layers):
                row = sub[60 * l + 12 * s:60 * l + 12 * s + 12]
                prev = [j for j in range(i) if row[j]]
                if row[i] and prev:
                    d.append((row[i] - row[prev[-1]]) / ghz / 1e3)
            if d:
                m = sum(d) / len(d)
                total += m
                parts.append(f"{names[i]} {m:.2f}")
        print(f"  {name}: " + " | ".join(parts) + f"  (total {total:.2f} us)")

if __name__ == "__main__":
    main()
