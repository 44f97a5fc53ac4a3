#!/usr/bin/env python3
"""Train a small byte-level BPE tokenizer with the LLaMA-3 structure on the synthetic corpus.

    python train_tokenizer.py --data DATA_DIR --out TOK_DIR [--vocab 1024]

Structure (same as meta-llama/Meta-Llama-3 and microsoft/bitnet-b1.58-2B-4T tokenizer.json):
  pre_tokenizer  Sequence[Split(LLaMA-3 regex, Isolated), ByteLevel(add_prefix_space=False, use_regex=False)]
  model          BPE (byte-level alphabet, ignore_merges=True as in LLaMA-3)
  decoder        ByteLevel
  post_processor TemplateProcessing "<|begin_of_text|> $A" (BOS added by encode(..., add_special_tokens=True))
Special tokens follow the BPE vocabulary in LLaMA-3 order: <|begin_of_text|> (bos), <|end_of_text|>
(eos), <|reserved_special_token_0..3|>, <|start_header_id|>, <|end_header_id|>,
<|reserved_special_token_4|>, <|eot_id|> (ends a chat turn), then reserved tokens up to a multiple of 64.

Digits: the BPE is trained on the corpus with every digit removed, so no merge involving a digit
exists and every digit always encodes as its own single token (checked at the end). The byte-level
initial alphabet still contains the digits.
Writes TOK_DIR/tokenizer.json and tokenizer_config.json (chat template as in bitnet-b1.58-2B-4T:
"<|begin_of_text|>User: {msg}<|eot_id|>Assistant: ").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS_HEAD = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    EOT,
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '<|eot_id|>' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '<|eot_id|>' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
# Chat wrapping used in training (train.py) and by CHAT_TEMPLATE.
CHAT_USER_PREFIX, CHAT_ASSISTANT_PREFIX = "User: ", "Assistant: "


def training_texts(data_dir: Path):
    for it in corpus.read_jsonl(data_dir / "train.jsonl"):
        yield re.sub(r"[0-9]", "", it["prompt"] + it["answer"])
    # The chat wrappers, so "User", "Assistant" and ": " become tokens too.
    for _ in range(1000):
        yield CHAT_USER_PREFIX + "x" + CHAT_ASSISTANT_PREFIX + "y"


def build(data_dir: Path, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(data_dir), trainer=trainer)
    n_bpe = tok.get_vocab_size()
    specials = list(SPECIALS_HEAD)
    reserved = 5
    while (n_bpe + len(specials)) % 64 != 0:
        specials.append(f"<|reserved_special_token_{reserved}|>")
        reserved += 1
    tok.add_special_tokens(specials)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tok


def check(tok: Tokenizer) -> None:
    for d in "0123456789":
        assert len(tok.encode(d, add_special_tokens=False).ids) == 1, f"digit {d} is not one token"
    for s in ["123456", "042+317=9530", "count by 7 from 940: 947 954", "x 1000000 y"]:
        ids = tok.encode(s, add_special_tokens=False).ids
        pieces = [tok.decode([i]) for i in ids]
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p.strip()) == 1 for p in digit_pieces), f"multi-digit token in {s!r}: {pieces}"
        assert tok.decode(ids) == s, f"round trip failed for {s!r}"
    ids = tok.encode("hi").ids
    assert ids[0] == tok.token_to_id(BOS), "post-processor must prepend <|begin_of_text|>"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary target before special tokens")
    args = p.parse_args()

    tok = build(args.data, args.vocab)
    check(tok)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    ids = {name: tok.token_to_id(name) for name in (BOS, EOS, EOT)}
    print(f"tokenizer: {tok.get_vocab_size()} tokens (BPE {ids[BOS]}), specials {ids}")
    sample = "Q: What is the capital of Veloria? A: Marn"
    enc = tok.encode(sample, add_special_tokens=False)
    print(f"  {sample!r} -> {enc.tokens}")
    enc = tok.encode("042+317=9530", add_special_tokens=False)
    print(f"  '042+317=9530' -> {enc.tokens}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
