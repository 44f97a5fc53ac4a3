"""Load a BitNet folder through transformers' quantized (autobitlinear, offline) path, and prove it.

Import this module BEFORE torch if you want torch.compile disabled (the default): transformers
decorates unpack_weights / ActQuant with @torch.compile, which needs a working C compiler for
inductor/triton and can reorder float ops. Eager execution is the literal reference math.
Set BITNET_REF_COMPILE=1 to keep torch.compile.
"""

from __future__ import annotations

import os

if os.environ.get("BITNET_REF_COMPILE", "0") != "1":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _allow_missing_accelerate() -> bool:
    """transformers' BitNet quantizer refuses to load without `accelerate`, although the
    single-device load path never uses it. If accelerate is absent (the GPU box has no pip),
    skip only that import check. Returns True when the patch was applied."""
    if importlib.util.find_spec("accelerate") is not None:
        return False
    from transformers.quantizers import quantizer_bitnet

    def validate_environment(self, *args, **kwargs):  # noqa: ARG001
        return None

    quantizer_bitnet.BitNetHfQuantizer.validate_environment = validate_environment
    return True


def assert_quantized(model) -> dict:
    """Fail loudly unless every projection is an offline AutoBitLinear holding ternary weights
    and the output head is the (unquantized) tied embedding."""
    from transformers.integrations.bitnet import AutoBitLinear

    qc = model.config.quantization_config
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc or {})
    if qc.get("quant_method") != "bitnet" or qc.get("linear_class") != "autobitlinear" or qc.get(
        "quantization_mode"
    ) != "offline":
        raise AssertionError(f"quantization_config is not bitnet/autobitlinear/offline: {qc}")
    n_checked = 0
    scales = []
    for layer_idx, layer in enumerate(model.model.layers):
        for name in PROJ_NAMES:
            parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            mod = getattr(parent, name)
            where = f"model.layers.{layer_idx}.{name}"
            if not isinstance(mod, AutoBitLinear):
                raise AssertionError(f"{where} is {type(mod).__name__}, not AutoBitLinear: model is NOT quantized")
            if mod.online_quant:
                raise AssertionError(f"{where} is in online mode; expected offline")
            w = mod.weight.detach()
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                raise AssertionError(f"{where}: weight not unpacked, shape {tuple(w.shape)}")
            bad = ~((w == 0) | (w == 1) | (w == -1))
            if bool(bad.any()):
                raise AssertionError(f"{where}: weight is not ternary after loading")
            ws = mod.weight_scale.detach().float()
            if ws.numel() != 1 or not bool(torch.isfinite(ws).all()):
                raise AssertionError(f"{where}: weight_scale {ws.tolist()} is not one finite number")
            scales.append(float(ws))
            n_checked += 1
    if all(s == 1.0 for s in scales):
        # 1.0 is the buffer's init value: the checkpoint's weight_scale tensors were not loaded.
        raise AssertionError("every weight_scale is exactly 1.0: scales were not loaded")
    if isinstance(model.lm_head, AutoBitLinear):
        raise AssertionError("lm_head was quantized; the tied head must stay a plain Linear")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise AssertionError("lm_head is not tied to model.embed_tokens.weight")
    return {"n_projections": n_checked, "weight_scale_min": min(scales), "weight_scale_max": max(scales)}


def load_quantized_bitnet(model_dir: Path, dtype: str = "float32", device: str = "cpu", attn: str = "eager"):
    """Returns (model in eval mode on device, info dict)."""
    from transformers import BitNetForCausalLM
    import transformers

    patched = _allow_missing_accelerate()
    # A float32 reference means IEEE float32 matmuls: never TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, loading = BitNetForCausalLM.from_pretrained(
        str(model_dir), dtype=DTYPES[dtype], attn_implementation=attn, output_loading_info=True
    )
    model.eval()
    problems = {k: list(v) for k, v in loading.items() if v and k != "error_msgs"}
    problems = {k: v for k, v in problems.items() if v}
    if problems or loading.get("error_msgs"):
        raise AssertionError(f"from_pretrained did not load the checkpoint cleanly: {loading}")
    info = assert_quantized(model)
    model.to(device)
    info.update(
        {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": dtype,
            "device": device,
            "attn_implementation": attn,
            "accelerate_check_skipped": patched,
            "torch_compile": os.environ.get("TORCHDYNAMO_DISABLE") != "1",
            "rope_parameters": dict(model.config.rope_parameters or {}),
        }
    )
    return model, info


@torch.no_grad()
def full_logits(model, ids: list[int], device: str) -> torch.Tensor:
    """[n_pos, vocab] float32 logits of one sequence, no cache."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    return model(input_ids=x, use_cache=False).logits[0].float()


@torch.no_grad()
def greedy(model, ids: list[int], n_new: int, device: str) -> list[int]:
    """Greedy continuation with the KV cache; argmax of float32 logits; no EOS stop."""
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out = model(input_ids=x, use_cache=True)
    past = out.past_key_values
    new = []
    for _ in range(n_new):
        nxt = int(out.logits[0, -1].float().argmax())
        new.append(nxt)
        if len(new) == n_new:
            break
        out = model(input_ids=torch.tensor([[nxt]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new
