#!/usr/bin/env python3
"""BitNet b1.58 quantization-aware training of a tiny BitNetForCausalLM from scratch.

    python train.py --data DATA_DIR --tokenizer TOK_DIR --out CKPT_DIR \
        [--steps 20000] [--time-budget 270] [--total-budget 350] [--batch 256] [--seq 128] [--lr 3e-3] \
        [--hidden 384 --intermediate 1024 --layers 6 --heads 6 --kv-heads 3] [--device cuda]

Model: transformers' BitNetForCausalLM with QATBitLinear projections (tiny_common.py): ternary
absmean weights (weight_scale rounded to bf16 as stored), per-token int8 absmax activations,
straight-through gradients; relu2, sub-norms, tied embeddings, RoPE theta 500000 are transformers'
inference code. Mixed precision: bf16 autocast on CUDA, float32 on CPU.

Data: train.jsonl examples are encoded as raw ("<bos>prompt answer<eos>") or, for half of the
question items (seeded), chat ("<bos>User: prompt<eot>Assistant: answer<eot>"); loss on the answer
and its stop token only (statements: on every token). Examples are packed whole into rows of --seq
tokens (each row starts with an example; tail padded and masked). Row order is a seeded permutation
per epoch, so the data order is deterministic.

Schedule: linear warm-up then cosine decay to 10%, driven by progress = max(step / steps,
elapsed / time_budget); training stops when progress reaches 1. So --time-budget bounds wall time
on any machine, and --steps alone gives a fully deterministic run.

At the end: norms and embeddings are rounded to bf16 (the storage dtype), the held-out exact match
per task is printed (float32, exact inference math) and CKPT_DIR/checkpoint.pt + train_log.json
are written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

T_START = time.time()

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_common as tc  # noqa: E402  (sets TORCHDYNAMO_DISABLE before torch)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import numpy as np  # noqa: E402

import corpus  # noqa: E402


def encode_training_rows(enc: tc.Encoder, items: list[dict], seq: int, seed: int, chat_fraction: float):
    """-> (inputs int32 [R, seq], labels int64 [R, seq], info) packed rows; labels -100 where masked."""
    rng = random.Random(seed)
    fmts = ["chat" if it["prompt"] and rng.random() < chat_fraction else "raw" for it in items]
    seqs: list[list[int]] = [[] for _ in items]
    n_loss_skip = np.zeros(len(items), dtype=np.int64)  # leading tokens without loss (the prompt)
    n_chat = 0
    for fmt in ("raw", "chat"):
        idx = [i for i, f in enumerate(fmts) if f == fmt]
        if not idx:
            continue
        n_chat += len(idx) if fmt == "chat" else 0
        sub = [items[i] for i in idx]
        for i, it, p, a in zip(idx, sub, enc.prompts(sub, fmt), enc.answers(sub, fmt)):
            seqs[i] = p + a
            n_loss_skip[i] = len(p) if it["prompt"] else 1
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if lens.max() > seq:
        raise ValueError(f"an example has {lens.max()} tokens, more than --seq {seq}")
    order = np.random.default_rng(seed + 1).permutation(len(items))
    # Greedy packing of whole examples, in order; each row starts with an example.
    row = np.empty(len(items), dtype=np.int64)
    off = np.empty(len(items), dtype=np.int64)
    r, cur = 0, 0
    for i in order.tolist():
        n = int(lens[i])
        if cur + n > seq:
            r, cur = r + 1, 0
        row[i], off[i] = r, cur
        cur += n
    n_rows = r + 1
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    within = np.arange(flat.size) - np.repeat(starts, lens)
    dest = np.repeat(row * seq + off, lens) + within
    x = np.full(n_rows * seq, enc.eos, dtype=np.int64)
    x[dest] = flat
    m = np.zeros(n_rows * seq, dtype=bool)
    m[dest] = within >= np.repeat(n_loss_skip, lens)
    x, m = x.reshape(n_rows, seq), m.reshape(n_rows, seq)
    labels = np.full((n_rows, seq), -100, dtype=np.int64)
    labels[:, :-1] = np.where(m[:, 1:], x[:, 1:], -100)
    info = {"rows": n_rows, "fill": float(lens.sum() / (n_rows * seq)), "chat_examples": n_chat,
            "max_example_len": int(lens.max()), "tokens": int(lens.sum())}
    return torch.from_numpy(x.astype(np.int32)), torch.from_numpy(labels), info


def lr_at(progress: float, peak: float, warmup_frac: float, final_frac: float = 0.1) -> float:
    if progress < warmup_frac:
        return peak * progress / warmup_frac
    p = min(1.0, (progress - warmup_frac) / max(1e-9, 1 - warmup_frac))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds of training (0 = no limit)")
    ap.add_argument("--total-budget", type=float, default=0.0,
                    help="seconds for the whole script incl. startup; training gets what is left minus "
                         "--eval-reserve (0 = no limit)")
    ap.add_argument("--eval-reserve", type=float, default=40.0)
    ap.add_argument("--batch", type=int, default=256, help="rows per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of progress")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--chat-fraction", type=float, default=0.3)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-batch", type=int, default=512)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    dev = args.device
    if dev == "cpu":
        torch.set_flush_denormal(True)  # denormal activations made CPU steps 5x slower mid-run
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    enc = tc.Encoder(args.tokenizer)
    items = corpus.read_jsonl(args.data / "train.jsonl")
    t0 = time.time()
    x_all, y_all, pack = encode_training_rows(enc, items, args.seq, args.seed, args.chat_fraction)
    print(f"data: {len(items)} examples -> {pack} in {time.time() - t0:.1f}s", flush=True)

    cfg = tc.model_config_dict(enc.vocab, args.hidden, args.intermediate, args.layers, args.heads,
                               args.kv_heads, enc.bos, enc.eos)
    model = tc.build_qat_model(cfg, attn="sdpa", seed=args.seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, H={args.hidden} I={args.intermediate} L={args.layers} "
          f"heads={args.heads}/{args.kv_heads} V={enc.vocab} device={dev}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if dev == "cuda" else {}),
    )
    x_all = x_all.to(dev)
    y_all = y_all.to(dev)
    n_rows = x_all.shape[0]
    gen = torch.Generator().manual_seed(args.seed + 7)
    perm = torch.randperm(n_rows, generator=gen)
    cursor, epoch = 0, 0

    model.train()
    log = []
    t_train = time.time()
    budget = args.time_budget if args.time_budget > 0 else float("inf")
    if args.total_budget > 0:
        budget = min(budget, args.total_budget - (t_train - T_START) - args.eval_reserve)
        if budget <= 0:
            raise SystemExit(f"no time left to train: startup took {t_train - T_START:.0f}s")
    print(f"training for at most {args.steps} steps / {budget:.0f}s", flush=True)
    step = 0
    progress = 0.0
    window_sum = torch.zeros((), device=dev)  # summed on device: no host sync per step
    window_n = 0
    last_window_loss = None
    while progress < 1.0:
        elapsed = time.time() - t_train
        progress = max(step / args.steps, elapsed / budget)
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        if cursor + args.batch > n_rows:
            epoch += 1
            perm = torch.randperm(n_rows, generator=gen)
            cursor = 0
        idx = perm[cursor : cursor + args.batch].to(dev)
        cursor += args.batch
        xb = x_all[idx].long()
        yb = y_all[idx]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda")):
            logits = model(input_ids=xb, use_cache=False).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), yb.view(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        window_sum += loss.detach()
        window_n += 1
        if step % args.log_every == 0 or step == 1:
            lv = float(window_sum) / window_n
            last_window_loss = lv
            window_sum.zero_()
            window_n = 0
            entry = {"step": step, "loss": lv, "lr": lr, "grad_norm": float(gnorm), "epoch": epoch,
                     "elapsed_s": round(time.time() - t_train, 1)}
            log.append(entry)
            print(f"step {step:6d} loss {lv:.4f} lr {lr:.2e} gnorm {float(gnorm):.2f} epoch {epoch} "
                  f"t {entry['elapsed_s']}s", flush=True)
    train_s = time.time() - t_train
    final_loss = float(window_sum) / window_n if window_n else last_window_loss
    print(f"final training loss (mean of the last logging window) {final_loss:.4f}")
    print(f"trained {step} steps in {train_s:.1f}s ({step / max(train_s, 1e-9):.1f} steps/s, "
          f"{step * args.batch * args.seq / max(train_s, 1e-9) / 1e6:.2f}M tokens/s)", flush=True)

    tc.round_float_params_to_bf16(model)
    model.eval()
    if dev == "cuda":  # the evaluation is the exact float32 inference math: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    results = []
    heldout = corpus.read_jsonl(args.data / "heldout.jsonl")
    t_eval = time.time()
    for fmt in ("raw", "chat"):
        results.append(tc.exact_match_eval(model, enc, heldout, fmt, dev, args.eval_batch))
    print(f"\nheld-out exact match after {step} steps (float32 QAT model, eval {time.time() - t_eval:.1f}s):")
    print(tc.accuracy_table(results), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "args": {k: str(v) for k, v in vars(args).items()}}, args.out / "checkpoint.pt")
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    summary = {"steps": step, "train_seconds": round(train_s, 1), "final_loss": final_loss,
               "n_params": n_params, "tokens_seen": step * args.batch * args.seq, "packing": pack,
               "epochs": epoch, "heldout": {r["format"]: r["accuracy"] for r in results},
               "args": {k: str(v) for k, v in vars(args).items()}, "log": log,
               "total_seconds": round(time.time() - T_START, 1)}
    (args.out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "heldout_samples_qat.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}/checkpoint.pt (total {summary['total_seconds']}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
