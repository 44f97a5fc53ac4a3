#!/usr/bin/env python3
"""Tabulates tools/llama_cpp/compare.sh's runs: one row per thread count and round.

llama-bench's JSON holds one record per test (pp128 and tg128, each at depth
128) with its mean tokens/s; `xtask bench --json` holds prompt_tok_per_s (128
prompt tokens) and gen_tok_per_s (128 tokens decoded after them).
"""
import glob
import json
import os
import re
import sys


def main(out):
    rows = {}
    for path in glob.glob(os.path.join(out, "*.json")):
        m = re.match(r"(llama|ours|ours-f16kv)-t(\d+)-(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        kind, threads, rnd = m.group(1), int(m.group(2)), int(m.group(3))
        with open(path) as f:
            data = json.load(f)
        row = rows.setdefault((threads, rnd), {})
        if kind == "llama":
            for rec in data:
                test = "pp" if rec["n_gen"] == 0 else "tg"
                row[f"llama_{test}"] = rec["avg_ts"]
                row["cpu"] = rec.get("cpu_info", "")
                row["build"] = rec.get("build_commit", "")
        else:
            key = "ours" if kind == "ours" else "ours16"
            row[f"{key}_pp"] = data["prompt_tok_per_s"]
            row[f"{key}_tg"] = data["gen_tok_per_s"]
    if not rows:
        sys.exit(f"no runs under {out}")
    cpu = next((r["cpu"] for r in rows.values() if r.get("cpu")), "?")
    print(f"CPU: {cpu}; llama.cpp build: {next((r['build'] for r in rows.values() if r.get('build')), '?')}")
    print()
    print("| threads | round | llama.cpp pp128 | ours pp128 (f32 / f16 KV) | llama.cpp tg128 | ours tg128 (f32 / f16 KV) | ours / llama.cpp, tg (f32 KV) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    for (threads, rnd) in sorted(rows, key=lambda k: (-k[0], k[1])):
        r = rows[(threads, rnd)]
        ratio = r["ours_tg"] / r["llama_tg"] if r.get("ours_tg") and r.get("llama_tg") else None
        print(
            f"| {threads} | {rnd} | {fmt(r.get('llama_pp'))} | {fmt(r.get('ours_pp'))} / {fmt(r.get('ours16_pp'))} "
            f"| {fmt(r.get('llama_tg'))} | {fmt(r.get('ours_tg'))} / {fmt(r.get('ours16_tg'))} "
            f"| {'-' if ratio is None else f'{ratio:.2f}x'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bitnet-llama-cpp/out")
