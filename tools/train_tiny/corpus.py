#!/usr/bin/env python3
"""Deterministic synthetic corpus of checkable tasks for a tiny BitNet model (no downloads).

    python corpus.py --out DATA_DIR [--seed 1234] [--n-train 400000] [--n-eval 200] [--width 3]

Writes DATA_DIR/train.jsonl, heldout.jsonl, train_eval.jsonl, facts.json, corpus_info.json.
Every line is {"task": ..., "prompt": ..., "answer": ...}. Training lines with prompt "" are plain
statements (the facts), learned as text; the others are trained on the answer only.

Tasks and format (chosen so a ~10M-parameter model can learn them in minutes):
  add      "042+317="           -> "9530"      operands zero-padded to --width digits, the sum
  sub      "317-042="           -> "572"       zero-padded and written LEAST-significant digit first
  count    "count up from 58:"  -> " 59 60 61 62 63"   also "count down from", "count by K from"
  copy     "copy: k x q p =>"   -> " k x q p"
  reverse  "reverse: k x q p =>"-> " p q x k"
  fact     "Q: What is the capital of Veloria? A:" -> " Marn"   over an invented table
Why this format: the tokenizer (train_tokenizer.py) is trained without digits, so every digit is
one token; fixed-width operands put each answer digit at a fixed distance from the operand digits it
depends on, and writing the answer least-significant digit first lets the model emit each digit
right after the carry it needs has been produced (most-significant-first would need the carry from
digits not yet written). Letters are space separated so each letter is one token and copy/reverse
work token by token.

Held-out split: same grammar, never-seen items. Arithmetic pairs (a, b), count (direction, start,
step) triples and copy/reverse strings are assigned to held-out by a hash, and training never
samples them. Facts cannot be inferred, so held-out facts use the training facts but question
phrasings that never occur in training (HELDOUT_QUESTION_TEMPLATES).
train_eval.jsonl: items from the training distribution (memorisation check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

TASKS = ("add", "sub", "count", "copy", "reverse", "fact")
# Mixture of training lines; "fact" covers statements and trained question templates.
TRAIN_MIX = {"add": 0.24, "sub": 0.20, "count": 0.16, "copy": 0.10, "reverse": 0.10, "fact": 0.20}

LETTERS = "abcdefghijklmnopqrstuvwxyz"
RELATIONS = ("capital", "language", "river")
STATEMENT_TEMPLATES = {
    "capital": ["The capital of {c} is {v}.", "{v} is the capital of {c}.", "{c} has its capital in {v}."],
    "language": ["The language of {c} is {v}.", "People in {c} speak {v}.", "{v} is spoken in {c}."],
    "river": ["The river of {c} is the {v}.", "The {v} flows through {c}.", "{c} lies on the river {v}."],
}
TRAIN_QUESTION_TEMPLATES = {
    "capital": ["Q: What is the capital of {c}? A:", "Q: Name the capital of {c}. A:"],
    "language": ["Q: What is the language of {c}? A:", "Q: Name the language of {c}. A:"],
    "river": ["Q: What is the river of {c}? A:", "Q: Name the river of {c}. A:"],
}
HELDOUT_QUESTION_TEMPLATES = {
    "capital": ["Q: Which city is the capital of {c}? A:", "Q: Tell me the capital of {c}. A:"],
    "language": ["Q: Which language is spoken in {c}? A:", "Q: Tell me the language of {c}. A:"],
    "river": ["Q: Which river flows through {c}? A:", "Q: Tell me the river of {c}. A:"],
}


def held_out(key: str, percent: int = 10) -> bool:
    """Stable membership test (sha256, not Python's salted hash)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < percent


# ---------------------------------------------------------------- invented world


def invent_names(rng: random.Random, n: int, syllables: tuple[int, int], suffixes: list[str]) -> list[str]:
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
    vowels = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
    codas = ["", "", "n", "r", "l", "s", "th", "m"]
    names: list[str] = []
    seen = set()
    while len(names) < n:
        k = rng.randint(*syllables)
        word = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(k))
        word = (word + rng.choice(suffixes)).capitalize()
        if word not in seen and 4 <= len(word) <= 11:
            seen.add(word)
            names.append(word)
    return names


def make_facts(seed: int, n_countries: int = 30) -> list[dict]:
    rng = random.Random(seed * 7919 + 17)
    countries = invent_names(rng, n_countries, (2, 3), ["ia", "ora", "and", "esh", "avia", ""])
    capitals = invent_names(rng, n_countries, (1, 2), ["", "", "ton", "grad"])
    languages = invent_names(rng, n_countries, (1, 2), ["ish", "ese", "ic", "an"])
    rivers = invent_names(rng, n_countries, (1, 2), ["", "a", "ine"])
    used = set(countries)
    for group in (capitals, languages, rivers):
        for i, name in enumerate(group):
            while name in used:  # keep every name unique across the table
                name = name + "o"
            group[i] = name
            used.add(name)
    return [
        {"country": c, "capital": cap, "language": lang, "river": riv}
        for c, cap, lang, riv in zip(countries, capitals, languages, rivers)
    ]


# ---------------------------------------------------------------- task generators


class Generator:
    def __init__(self, seed: int, width: int, facts: list[dict]):
        self.rng = random.Random(seed)
        self.width = width
        self.facts = facts

    def _pair(self, split: str, task: str) -> tuple[int, int]:
        hi = 10**self.width - 1
        while True:
            a, b = self.rng.randint(0, hi), self.rng.randint(0, hi)
            if task == "sub" and a < b:
                a, b = b, a
            if held_out(f"{task}:{a}:{b}") == (split == "heldout"):
                return a, b

    def add(self, split: str) -> dict:
        a, b = self._pair(split, "add")
        w = self.width
        return {"task": "add", "prompt": f"{a:0{w}d}+{b:0{w}d}=", "answer": f"{a + b:0{w + 1}d}"[::-1]}

    def sub(self, split: str) -> dict:
        a, b = self._pair(split, "sub")
        w = self.width
        return {"task": "sub", "prompt": f"{a:0{w}d}-{b:0{w}d}=", "answer": f"{a - b:0{w}d}"[::-1]}

    def count(self, split: str) -> dict:
        while True:
            kind = self.rng.choice(["up", "down", "by"])
            step = {"up": 1, "down": -1}.get(kind) or self.rng.randint(2, 9)
            start = self.rng.randint(5, 999) if kind == "down" else self.rng.randint(0, 949)
            if held_out(f"count:{kind}:{start}:{step}") == (split == "heldout"):
                break
        values = [start + step * (i + 1) for i in range(5)]
        if kind == "down":
            values = [v for v in values if v >= 0]
        prompt = {"up": f"count up from {start}:", "down": f"count down from {start}:",
                  "by": f"count by {step} from {start}:"}[kind]
        return {"task": "count", "prompt": prompt, "answer": "".join(f" {v}" for v in values)}

    def _letters(self, split: str, task: str) -> str:
        while True:
            n = self.rng.randint(3, 7)
            s = "".join(self.rng.choice(LETTERS) for _ in range(n))
            if held_out(f"str:{s}") == (split == "heldout"):
                return s

    def copy(self, split: str) -> dict:
        s = " ".join(self._letters(split, "copy"))
        return {"task": "copy", "prompt": f"copy: {s} =>", "answer": f" {s}"}

    def reverse(self, split: str) -> dict:
        s = self._letters(split, "reverse")
        return {"task": "reverse", "prompt": f"reverse: {' '.join(s)} =>", "answer": " " + " ".join(s[::-1])}

    def fact(self, split: str) -> dict:
        row = self.rng.choice(self.facts)
        rel = self.rng.choice(RELATIONS)
        if split == "train" and self.rng.random() < 0.5:
            text = self.rng.choice(STATEMENT_TEMPLATES[rel]).format(c=row["country"], v=row[rel])
            return {"task": "fact", "prompt": "", "answer": text}
        templates = TRAIN_QUESTION_TEMPLATES if split == "train" else HELDOUT_QUESTION_TEMPLATES
        prompt = self.rng.choice(templates[rel]).format(c=row["country"])
        return {"task": "fact", "prompt": prompt, "answer": " " + row[rel]}

    def item(self, task: str, split: str) -> dict:
        return getattr(self, task)(split)


def eval_items(gen: Generator, split: str, n_per_task: int) -> list[dict]:
    """n_per_task distinct prompts per task (facts: each (country, relation) question at most once)."""
    out = []
    for task in TASKS:
        seen: set[str] = set()
        tries = 0
        while len(seen) < n_per_task and tries < 50 * n_per_task:
            tries += 1
            it = gen.item(task, "heldout" if split == "heldout" else "train")
            if not it["prompt"] or it["prompt"] in seen:
                continue
            seen.add(it["prompt"])
            out.append(it)
    return out


def write_jsonl(path: Path, items: list[dict]) -> None:
    with open(path, "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-train", type=int, default=400_000)
    p.add_argument("--n-eval", type=int, default=200, help="items per task in heldout / train_eval")
    p.add_argument("--width", type=int, default=3, help="digits per arithmetic operand")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(args.seed)
    gen = Generator(args.seed, args.width, facts)
    tasks = list(TRAIN_MIX)
    weights = [TRAIN_MIX[t] for t in tasks]
    pick = random.Random(args.seed + 1)
    train = [gen.item(pick.choices(tasks, weights)[0], "train") for _ in range(args.n_train)]
    heldout = eval_items(Generator(args.seed + 2, args.width, facts), "heldout", args.n_eval)
    train_eval = eval_items(Generator(args.seed + 3, args.width, facts), "train", args.n_eval)

    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "heldout.jsonl", heldout)
    write_jsonl(args.out / "train_eval.jsonl", train_eval)
    (args.out / "facts.json").write_text(json.dumps(facts, indent=1) + "\n")
    counts = {t: sum(1 for it in train if it["task"] == t) for t in TASKS}
    info = {"seed": args.seed, "width": args.width, "n_train": len(train), "train_counts": counts,
            "n_heldout": len(heldout), "n_train_eval": len(train_eval), "n_facts": len(facts) * len(RELATIONS)}
    (args.out / "corpus_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"corpus: {info}")
    for it in train[:6] + heldout[:: max(1, len(heldout) // 6)][:6]:
        print(f"  {it['task']:8s} {it['prompt']!r} -> {it['answer']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
