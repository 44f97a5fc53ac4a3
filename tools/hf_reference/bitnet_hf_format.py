"""The microsoft/bitnet-b1.58-2B-4T Hugging Face folder layout, in numpy only.

Shared by make_random_hf.py, numpy_forward.py and tools/train_tiny/export_hf.py.
Nothing here imports torch or transformers, so numpy_forward.py stays an
independent reference. hf_layout.md is the prose version of this file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# Projections stored as packed ternary, per layer, with (module path, which dims).
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.attn_sub_norm",
    "mlp.ffn_sub_norm",
)


# ---------------------------------------------------------------- config


def make_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int = 4096,
    rope_theta: float = 500000.0,
    rms_norm_eps: float = 1e-5,
    bos_token_id: int = 128000,
    eos_token_id: int = 128001,
) -> dict:
    """config.json in the key set microsoft/bitnet-b1.58-2B-4T publishes (minus auto_map)."""
    if hidden_size % num_attention_heads != 0:
        raise ValueError("hidden_size must be a multiple of num_attention_heads (head_dim = H / heads)")
    if num_attention_heads % num_key_value_heads != 0:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    head_dim = hidden_size // num_attention_heads
    if head_dim % 2 != 0:
        raise ValueError("head_dim must be even for rotate_half RoPE")
    for name, value in (
        ("q_proj out", hidden_size),
        ("k/v_proj out", num_key_value_heads * head_dim),
        ("intermediate_size", intermediate_size),
    ):
        if value % 4 != 0:
            raise ValueError(f"{name} = {value} must be a multiple of 4 (2-bit packing along rows)")
    return {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "relu2",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": float(rope_theta),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "bitnet",
            "linear_class": "autobitlinear",
            "quantization_mode": "offline",
        },
    }


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Unpacked [out, in] shape of each projection."""
    h = config["hidden_size"]
    i = config["intermediate_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    q = config["num_attention_heads"] * head_dim
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def norm_width(config: dict, norm: str) -> int:
    if norm == "mlp.ffn_sub_norm":
        return config["intermediate_size"]
    return config["hidden_size"]


def expected_tensors(config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of model.safetensors: name -> (safetensors dtype, shape)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("BF16", (config["vocab_size"], config["hidden_size"])),
        "model.norm.weight": ("BF16", (config["hidden_size"],)),
    }
    shapes = projection_shapes(config)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for norm in LAYER_NORMS:
            out[prefix + norm + ".weight"] = ("BF16", (norm_width(config, norm),))
        for proj in PROJECTIONS:
            rows, cols = shapes[proj]
            out[prefix + proj + ".weight"] = ("U8", (rows // 4, cols))
            out[prefix + proj + ".weight_scale"] = ("BF16", (1,))
    return out


# ---------------------------------------------------------------- ternary packing


def ternarize(w: np.ndarray) -> tuple[np.ndarray, float]:
    """FORMATS.md: scale = mean|W| clamped 1e-5, t = clamp(round(W/scale), -1, 1)."""
    w = w.astype(np.float32)
    scale = max(float(np.abs(w).mean()), 1e-5)
    t = np.clip(np.round(w / np.float32(scale)), -1, 1).astype(np.int8)
    return t, scale


def pack_ternary(t: np.ndarray) -> np.ndarray:
    """[out, in] int8 in {-1,0,1} -> uint8 [out/4, in].

    Packed row p, bits 2i..2i+1 (LSB first) hold unpacked row i*(out/4) + p; field = t + 1.
    """
    if t.ndim != 2 or t.shape[0] % 4 != 0:
        raise ValueError(f"pack_ternary needs [out, in] with out % 4 == 0, got {t.shape}")
    if t.min() < -1 or t.max() > 1:
        raise ValueError("pack_ternary: values outside {-1, 0, 1}")
    rows = t.shape[0] // 4
    fields = (t.astype(np.int16) + 1).astype(np.uint8)
    packed = np.zeros((rows, t.shape[1]), dtype=np.uint8)
    for i in range(4):
        packed |= fields[i * rows : (i + 1) * rows] << np.uint8(2 * i)
    return packed


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
    """uint8 [out/4, in] -> int8 [out, in] in {-1,0,1}; field 3 is rejected."""
    rows = packed.shape[0]
    out = np.empty((4 * rows, packed.shape[1]), dtype=np.int8)
    for i in range(4):
        field = (packed >> np.uint8(2 * i)) & np.uint8(3)
        if np.any(field == 3):
            raise ValueError("unpack_ternary: field value 3 is not a valid ternary code")
        out[i * rows : (i + 1) * rows] = field.astype(np.int8) - 1
    return out


# ---------------------------------------------------------------- bf16 in numpy


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16, returned as uint16 bit patterns (what torch does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    if np.any(np.isnan(x)):
        raise ValueError("NaN in tensor being converted to bf16")
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(f32_to_bf16_bits(x))


# ---------------------------------------------------------------- safetensors (no dependency)

_ST_DTYPES = {"U8": np.uint8, "BF16": np.uint16, "F32": np.float32, "F16": np.float16, "I8": np.int8}


def save_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """tensors: name -> (dtype tag, array). BF16 arrays are given as uint16 bit patterns.

    Writes header {"__metadata__": {"format": "pt"}, ...} with names sorted and data in the
    same order, header padded with spaces to a multiple of 8 (as the safetensors library does).
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        tag, arr = tensors[name]
        want = _ST_DTYPES[tag]
        if arr.dtype != want:
            raise TypeError(f"{name}: dtype tag {tag} needs numpy {np.dtype(want)}, got {arr.dtype}")
        data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * ((8 - len(header_bytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for data in blobs:
            f.write(data)


def load_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype tag, array); BF16 comes back as uint16 bits."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tag = info["dtype"]
        if tag not in _ST_DTYPES:
            raise ValueError(f"{name}: unsupported safetensors dtype {tag}")
        start, end = info["data_offsets"]
        arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[tag]).newbyteorder("<"), count=-1, offset=base + start)
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if (end - start) != count * arr.itemsize:
            raise ValueError(f"{name}: data_offsets length {end - start} != shape {info['shape']} x {arr.itemsize}")
        out[name] = (tag, arr[:count].reshape(info["shape"]).copy())
    return out


def validate_folder_tensors(config: dict, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Raise if model.safetensors does not hold exactly the tensors hf_layout.md lists."""
    want = expected_tensors(config)
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"tensor set mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, (tag, shape) in want.items():
        got_tag, arr = tensors[name]
        if got_tag != tag or tuple(arr.shape) != shape:
            raise ValueError(f"{name}: expected {tag} {shape}, found {got_tag} {tuple(arr.shape)}")


def write_model_folder(
    out_dir: Path,
    config: dict,
    *,
    embed: np.ndarray,
    final_norm: np.ndarray,
    layers: list[dict[str, np.ndarray]],
    scales: list[dict[str, float]],
    ternary: list[dict[str, np.ndarray]],
) -> None:
    """Write config.json + model.safetensors.

    embed, final_norm and layers[l][norm] are float32 (rounded to bf16 here);
    ternary[l][proj] is int8 [out, in]; scales[l][proj] is the f32 weight_scale (rounded to bf16 here).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, tuple[str, np.ndarray]] = {
        "model.embed_tokens.weight": ("BF16", f32_to_bf16_bits(embed)),
        "model.norm.weight": ("BF16", f32_to_bf16_bits(final_norm)),
    }
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for norm in LAYER_NORMS:
            tensors[prefix + norm + ".weight"] = ("BF16", f32_to_bf16_bits(layers[layer][norm]))
        for proj in PROJECTIONS:
            tensors[prefix + proj + ".weight"] = ("U8", pack_ternary(ternary[layer][proj]))
            scale = np.array([scales[layer][proj]], dtype=np.float32)
            tensors[prefix + proj + ".weight_scale"] = ("BF16", f32_to_bf16_bits(scale))
    validate_folder_tensors(config, tensors)
    save_safetensors(out_dir / "model.safetensors", tensors)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_model_folder(model_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """config and float32 tensors (projections unpacked to int8 ternary, scales to python floats in f32)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    tensors = load_safetensors(model_dir / "model.safetensors")
    validate_folder_tensors(config, tensors)
    out: dict[str, np.ndarray] = {}
    for name, (tag, arr) in tensors.items():
        if tag == "U8":
            out[name] = unpack_ternary(arr)
        elif tag == "BF16":
            out[name] = bf16_bits_to_f32(arr)
        else:
            out[name] = arr.astype(np.float32)
    return config, out
