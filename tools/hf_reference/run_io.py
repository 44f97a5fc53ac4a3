"""File formats shared by hf_forward.py, numpy_forward.py and compare.py (numpy only).

Inputs:  tokens JSON {"sequences": [[id, ...], ...]}.
Outputs, in --out DIR:
  logits.npy        float32 [n_seq, n_pos, vocab]   when every sequence has the same length
  logits_<i>.npy    float32 [n_pos_i, vocab]        one per sequence otherwise
  greedy.json       {"sequences": [[new ids...], ...]}   continuation only (prompt excluded)
  meta.json         what produced the files
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_tokens(path: Path) -> list[list[int]]:
    data = json.loads(Path(path).read_text())
    seqs = data["sequences"] if isinstance(data, dict) else data
    if not seqs or not all(isinstance(s, list) and s and all(isinstance(t, int) for t in s) for s in seqs):
        raise ValueError(f"{path}: expected {{\"sequences\": [[int, ...], ...]}} with non-empty sequences")
    return seqs


def write_logits(out_dir: Path, logits: list[np.ndarray]) -> list[str]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("logits_*.npy")) + [out_dir / "logits.npy"]:
        if stale.exists():
            stale.unlink()
    if len({a.shape for a in logits}) == 1:
        np.save(out_dir / "logits.npy", np.stack(logits).astype(np.float32))
        return ["logits.npy"]
    names = []
    for i, a in enumerate(logits):
        name = f"logits_{i}.npy"
        np.save(out_dir / name, a.astype(np.float32))
        names.append(name)
    return names


def load_logits(path: Path) -> list[np.ndarray]:
    """A .npy file ([n_pos, V] or [n_seq, n_pos, V]) or a folder written by write_logits -> list of [n_pos, V]."""
    path = Path(path)
    if path.is_dir():
        if (path / "logits.npy").exists():
            return load_logits(path / "logits.npy")
        files = sorted(path.glob("logits_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
        if not files:
            raise FileNotFoundError(f"{path}: no logits.npy or logits_<i>.npy")
        return [np.load(f).astype(np.float32) for f in files]
    a = np.load(path).astype(np.float32)
    if a.ndim == 2:
        return [a]
    if a.ndim == 3:
        return list(a)
    raise ValueError(f"{path}: expected 2 or 3 dims, got shape {a.shape}")


def write_greedy(out_dir: Path, continuations: list[list[int]]) -> None:
    (Path(out_dir) / "greedy.json").write_text(json.dumps({"sequences": continuations}) + "\n")


def read_greedy(path: Path) -> list[list[int]]:
    data = json.loads(Path(path).read_text())
    return data["sequences"] if isinstance(data, dict) else data


def write_meta(out_dir: Path, meta: dict) -> None:
    (Path(out_dir) / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
