#!/usr/bin/env python3
"""Export a train.py checkpoint as a microsoft/bitnet-b1.58-2B-4T-layout folder and prove it loads
back as exactly the trained model.

    python export_hf.py --ckpt CKPT_DIR --tokenizer TOK_DIR --data DATA_DIR --out MODEL_DIR [--device cpu|cuda]
        [--tokens-out FILE.json]

Writes (layout: tools/hf_reference/hf_layout.md): config.json, model.safetensors (uint8-packed ternary
projections + bf16 weight_scale, bf16 norms and embeddings, no lm_head), tokenizer.json,
tokenizer_config.json, generation_config.json, export_check.json.
Ternarization is tiny_common.weight_ternary, the function the QAT forward uses:
mean = mean|W| clamped 1e-5, t = clamp(round(W * (1/mean)), -1, 1), weight_scale = bf16(mean).

Check: BitNetForCausalLM.from_pretrained(MODEL_DIR) through the quantized offline path (asserted
by hf_reference/hf_load.py), float32, eager attention, versus the QAT model in float32 on the same
prompts (held-out items, raw and chat): max relative error (compare.py's definition) and greedy
continuations. Exit 1 if the error exceeds --max-rel or any greedy continuation differs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_common as tc  # noqa: E402  (sets TORCHDYNAMO_DISABLE before torch)
import torch  # noqa: E402

import bitnet_hf_format as fmt  # noqa: E402  (tools/hf_reference, on sys.path via tiny_common)
import corpus  # noqa: E402
import hf_load  # noqa: E402


def load_qat(ckpt_dir: Path, attn: str, device: str):
    ck = torch.load(ckpt_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = tc.build_qat_model(ck["config"], attn=attn)
    missing, unexpected = model.load_state_dict(ck["state_dict"], strict=False)
    # lm_head.weight is the tied embedding; anything else missing is an error.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), ck["config"]


def export(model, cfg: dict, out: Path, tokenizer_dir: Path) -> dict:
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    layers, scales, terns = [], [], []
    scale_values = []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        layers.append({norm: sd[p + norm + ".weight"].numpy() for norm in fmt.LAYER_NORMS})
        sc, tn = {}, {}
        for proj in fmt.PROJECTIONS:
            w = dict(model.named_parameters())[p + proj + ".weight"]
            t, ws = tc.weight_ternary(w)  # same function and device as the QAT forward
            tn[proj] = t.cpu().numpy().astype("int8")
            sc[proj] = float(ws)
            scale_values.append(float(ws))
        scales.append(sc)
        terns.append(tn)
    for name, arr in [("embed", sd["model.embed_tokens.weight"]), ("norm", sd["model.norm.weight"])]:
        if not torch.equal(arr, arr.to(torch.bfloat16).float()):
            raise AssertionError(f"{name} is not bf16-representable: run round_float_params_to_bf16 first")
    fmt.write_model_folder(out, cfg, embed=sd["model.embed_tokens.weight"].numpy(),
                           final_norm=sd["model.norm.weight"].numpy(), layers=layers, scales=scales, ternary=terns)
    shutil.copy(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(tokenizer_dir / "tokenizer_config.json", out / "tokenizer_config.json")
    enc = tc.Encoder(tokenizer_dir)
    gen_cfg = {"bos_token_id": enc.bos, "eos_token_id": [enc.eos, enc.eot], "do_sample": False,
               "max_new_tokens": 32}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    zeros = sum(int((t == 0).sum()) for tl in terns for t in tl.values())
    total = sum(t.size for tl in terns for t in tl.values())
    return {"weight_scale_min": min(scale_values), "weight_scale_max": max(scale_values),
            "ternary_zero_fraction": zeros / total}


def check_tokenizer(model_dir: Path, enc: tc.Encoder) -> dict:
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(model_dir))
    msgs = [{"role": "user", "content": "042+317="}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    want = enc.prompts([{"prompt": "042+317=", "answer": ""}], "chat")[0]
    if list(ids) != want:
        raise AssertionError(f"chat template tokenization {list(ids)} != training format {want}")
    plain = hf_tok("042+317=")["input_ids"]
    if list(plain) != enc.prompts([{"prompt": "042+317=", "answer": ""}], "raw")[0]:
        raise AssertionError(f"AutoTokenizer encode {plain} does not start with BOS as in training")
    return {"chat_prompt_ids": want, "bos_token": hf_tok.bos_token, "eos_token": hf_tok.eos_token}


@torch.no_grad()
def compare_models(qat, hf, enc: tc.Encoder, items: list[dict], device: str) -> dict:
    worst, max_abs, agree, n_pos = 0.0, 0.0, 0, 0
    greedy_equal = 0
    prompts = enc.prompts(items, "raw") + enc.prompts(items, "chat")
    answers = enc.answers(items, "raw") + enc.answers(items, "chat")
    for p, a in zip(prompts, answers):
        ids = torch.tensor([p + a], device=device)
        la = qat(input_ids=ids, use_cache=False).logits[0].float()
        lb = hf(input_ids=ids, use_cache=False).logits[0].float()
        rel = (la - lb).abs().amax(-1) / lb.abs().amax(-1).clamp(min=1e-30)
        worst = max(worst, float(rel.max()))
        max_abs = max(max_abs, float((la - lb).abs().max()))
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        n_pos += la.shape[0]
    stop = {enc.eos, enc.eot}
    for p in prompts[:32]:
        ga = tc.greedy_batch(qat, [p], 12, stop, device)
        gb = tc.greedy_batch(hf, [p], 12, stop, device)
        greedy_equal += int(ga == gb)
    return {"sequences": len(prompts), "positions": n_pos, "max_rel_error": worst, "max_abs_error": max_abs,
            "top1_agreement": agree / n_pos, "greedy_equal": f"{greedy_equal}/{min(32, len(prompts))}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, type=Path)
    ap.add_argument("--tokenizer", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-check", type=int, default=48, help="held-out items used for the logits check")
    ap.add_argument("--max-rel", type=float, default=1e-5)
    ap.add_argument("--tokens-out", type=Path,
                    help="also write {'sequences': [...]} of held-out prompts (raw and chat) for hf_forward.py")
    args = ap.parse_args()

    qat, cfg = load_qat(args.ckpt, "eager", args.device)
    info = export(qat, cfg, args.out, args.tokenizer)
    print(f"exported {args.out}: {info}")
    enc = tc.Encoder(args.tokenizer)
    info["tokenizer"] = check_tokenizer(args.out, enc)
    hf, load_info = hf_load.load_quantized_bitnet(args.out, "float32", args.device, "eager")
    print(f"reloaded through transformers (quantized, offline): {load_info}")
    items = corpus.read_jsonl(args.data / "heldout.jsonl")
    step = max(1, len(items) // args.n_check)
    check_items = items[::step][: args.n_check]
    check = compare_models(qat, hf, enc, check_items, args.device)
    if args.tokens_out:
        few = check_items[:: max(1, len(check_items) // 8)][:8]
        seqs = enc.prompts(few, "raw") + enc.prompts(few, "chat")
        args.tokens_out.write_text(json.dumps({"sequences": seqs, "items": few}) + "\n")
    info.update({"check": check, "hf_load": load_info})
    (args.out / "export_check.json").write_text(json.dumps(info, indent=1) + "\n")
    n_equal, n_greedy = check["greedy_equal"].split("/")
    ok = check["max_rel_error"] <= args.max_rel and n_equal == n_greedy
    print(f"QAT (float32) vs exported HF model: max relative error {check['max_rel_error']:.3e} over "
          f"{check['positions']} positions, top-1 agreement {check['top1_agreement']:.4f}, "
          f"greedy equal {check['greedy_equal']}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
