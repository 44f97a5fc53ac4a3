"""Shared by train.py, export_hf.py and eval_hf.py: the QAT BitLinear, model construction,
example encoding (raw and chat formats) and batched greedy exact-match evaluation.

The QAT model is transformers' own BitNetForCausalLM (so RMSNorm, sub-norms, relu2, RoPE, GQA and
the tied head are literally the inference code) with its seven projections per layer replaced by
QATBitLinear, whose forward is exactly transformers' AutoBitLinear offline forward:
    y = F.linear(ActQuant(x), t) * weight_scale
with t, weight_scale derived from the float master weight W on the fly:
    mean = mean|W| clamped >= 1e-5;  t = clamp(round(W * (1/mean)), -1, 1)   (HF WeightQuant)
    weight_scale = bf16(mean)        (the value the exported checkpoint stores, so the
                                      exported model is exactly the trained one)
and straight-through gradients for both quantizers (dL/dW = dL/dW_q, dL/dx = dL/dx_q).
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # transformers' @torch.compile helpers run eagerly

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "hf_reference"))

from train_tokenizer import BOS, CHAT_ASSISTANT_PREFIX, CHAT_USER_PREFIX, EOS, EOT  # noqa: E402

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- quantization


def weight_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t float32 in {-1,0,1}, weight_scale float32 scalar rounded to bf16). Used by training AND export."""
    wf = w.detach().float()
    mean = wf.abs().mean().clamp(min=1e-5)
    t = (wf * (1.0 / mean)).round().clamp(-1, 1)
    return t, mean.to(torch.bfloat16).float()


def act_quant(x: torch.Tensor) -> torch.Tensor:
    """transformers ActQuant.forward, literally: per-token absmax int8, returned dequantized in x.dtype."""
    dtype = x.dtype
    a = x.float()
    scale = 127 / a.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    a = (a * scale).round().clamp(-128, 127) / scale
    return a.to(dtype)


class _BitLinearSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        t, ws = weight_ternary(w)
        xq = act_quant(x)
        t = t.to(xq.dtype)
        ws = ws.to(xq.dtype)
        ctx.save_for_backward(xq, t, ws)
        ctx.w_dtype = w.dtype
        return F.linear(xq, t) * ws

    @staticmethod
    def backward(ctx, gy):
        xq, t, ws = ctx.saved_tensors
        wq = (t * ws).to(gy.dtype)
        gx = gy @ wq
        gw = gy.reshape(-1, gy.shape[-1]).t().to(xq.dtype) @ xq.reshape(-1, xq.shape[-1])
        return gx, gw.to(ctx.w_dtype)


class QATBitLinear(nn.Linear):
    """nn.Linear holding the float master weight; forward = AutoBitLinear(offline) of its ternarization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            # Matmuls in the autocast dtype (bf16): xq = q/s and t are rounded to bf16; training only.
            dt = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return _BitLinearSTE.apply(x.to(dt), self.weight)
        return _BitLinearSTE.apply(x, self.weight)


# ---------------------------------------------------------------- model


def model_config_dict(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                      bos: int, eos: int, rope_theta: float = 500000.0, max_pos: int = 4096) -> dict:
    import bitnet_hf_format as fmt

    if hidden % 128 or intermediate % 128:
        raise ValueError("hidden and intermediate must be multiples of 128 (I2_S kernels need K % 128 == 0)")
    return fmt.make_config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                           max_position_embeddings=max_pos, rope_theta=rope_theta, bos_token_id=bos,
                           eos_token_id=eos)


def build_qat_model(cfg: dict, attn: str = "sdpa", seed: int = 0):
    """transformers BitNetForCausalLM from our config.json dict (without quantization_config: a float
    model) with every projection swapped for QATBitLinear. Tied embeddings."""
    from transformers import BitNetConfig, BitNetForCausalLM

    plain = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "torch_dtype")}
    config = BitNetConfig(**plain)
    torch.manual_seed(seed)
    model = BitNetForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    for layer in model.model.layers:
        for name in PROJ_NAMES:
            parent = layer.mlp if name in ("gate_proj", "up_proj", "down_proj") else layer.self_attn
            old = getattr(parent, name)
            new = QATBitLinear(old.in_features, old.out_features, bias=False)
            with torch.no_grad():
                new.weight.copy_(old.weight)
            setattr(parent, name, new)
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise AssertionError("lm_head is not tied to embed_tokens")
    return model


def round_float_params_to_bf16(model) -> None:
    """Norms and embeddings are stored in bf16; round the masters so the trained model is the exported one."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(name.endswith(f"{proj}.weight") for proj in PROJ_NAMES):
                p.copy_(p.to(torch.bfloat16).float())


# ---------------------------------------------------------------- examples


class Encoder:
    def __init__(self, tokenizer_dir: Path):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        self.bos = self.tok.token_to_id(BOS)
        self.eos = self.tok.token_to_id(EOS)
        self.eot = self.tok.token_to_id(EOT)
        self.vocab = self.tok.get_vocab_size()

    def enc(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def prompts(self, items: list[dict], fmt: str) -> list[list[int]]:
        """Token ids the model is given at evaluation (and sees before the answer in training)."""
        if fmt == "raw":
            return [[self.bos] + ids for ids in self.enc([it["prompt"] for it in items])]
        users = self.enc([CHAT_USER_PREFIX + it["prompt"] for it in items])
        asst = self.enc([CHAT_ASSISTANT_PREFIX])[0]
        return [[self.bos] + u + [self.eot] + asst for u in users]

    def answers(self, items: list[dict], fmt: str) -> list[list[int]]:
        """Answer ids followed by the stop token (raw: <|end_of_text|>, chat: <|eot_id|>)."""
        if fmt == "raw":
            return [ids + [self.eos] for ids in self.enc([it["answer"] for it in items])]
        return [ids + [self.eot] for ids in self.enc([it["answer"].lstrip(" ") for it in items])]

    def expected_text(self, item: dict, fmt: str) -> str:
        return item["answer"] if fmt == "raw" else item["answer"].lstrip(" ")

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_batch(model, prompts: list[list[int]], max_new: int, stop: set[int], device: str) -> list[list[int]]:
    """Greedy continuation of equal-length prompts (no padding), KV cache, float32 argmax.
    Each output is cut before its first stop token; None-stop outputs are kept as generated."""
    x = torch.tensor(prompts, dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=True)
    past = out.past_key_values
    gen = []
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new):
        nxt = out.logits[:, -1].float().argmax(-1)
        gen.append(nxt)
        done |= torch.isin(nxt, torch.tensor(sorted(stop), device=device))
        if bool(done.all()) or step == max_new - 1:
            break
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
    rows = torch.stack(gen, 1).tolist()
    result = []
    for r in rows:
        cut = next((i for i, t in enumerate(r) if t in stop), None)
        result.append(r[:cut] if cut is not None else r + [-1])  # -1 marks "never stopped"
    return result


def exact_match_eval(model, encoder: Encoder, items: list[dict], fmt: str, device: str,
                     batch: int = 256) -> dict:
    """Per-task exact-match accuracy; a hit = generated text before the stop token == expected answer."""
    prompts = encoder.prompts(items, fmt)
    answers = encoder.answers(items, fmt)
    stop = {encoder.eos, encoder.eot}
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    outputs: list[list[int] | None] = [None] * len(items)
    for _, idx in sorted(groups.items()):
        for start in range(0, len(idx), batch):
            chunk = idx[start : start + batch]
            max_new = max(len(answers[i]) for i in chunk) + 1
            gens = greedy_batch(model, [prompts[i] for i in chunk], max_new, stop, device)
            for i, g in zip(chunk, gens):
                outputs[i] = g
    per_task: dict[str, list[int]] = {}
    samples = []
    for it, g in zip(items, outputs):
        stopped = not g or g[-1] != -1
        text = encoder.decode([t for t in g if t >= 0])
        ok = stopped and text == encoder.expected_text(it, fmt)
        per_task.setdefault(it["task"], []).append(int(ok))
        if len(samples) < 400:
            samples.append({"task": it["task"], "prompt": it["prompt"], "expected": encoder.expected_text(it, fmt),
                            "got": text if stopped else text + " <no stop>", "ok": ok})
    acc = {t: {"correct": sum(v), "total": len(v), "accuracy": sum(v) / len(v)} for t, v in per_task.items()}
    n = sum(a["total"] for a in acc.values())
    acc["all"] = {"correct": sum(a["correct"] for a in acc.values()), "total": n,
                  "accuracy": sum(a["correct"] for a in acc.values()) / max(n, 1)}
    return {"format": fmt, "accuracy": acc, "samples": samples}


def accuracy_table(results: list[dict]) -> str:
    """Markdown table, one column per result (format)."""
    tasks = [t for t in results[0]["accuracy"] if t != "all"] + ["all"]
    head = "| task | " + " | ".join(f"exact match ({r['format']})" for r in results) + " |"
    lines = [head, "|---|" + "---:|" * len(results)]
    for t in tasks:
        cells = []
        for r in results:
            a = r["accuracy"][t]
            cells.append(f"{100 * a['accuracy']:.1f}% ({a['correct']}/{a['total']})")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
