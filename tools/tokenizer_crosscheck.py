#!/usr/bin/env python3
"""Record HF's own encodings of our synthetic tokenizer, for the Rust cross-check test.

    pip install tokenizers transformers jinja2
    python tools/tokenizer_crosscheck.py

Reads crates/bitnet-models/tests/data/tokenizer/synthetic_512.tokenizer.json and
synthetic_512.tokenizer_config.json (written by the Rust test
`committed_synthetic_files_describe_synthetic_512` when run with
BITNET_UPDATE_TOKENIZER_DATA=1), and writes synthetic_512.crosscheck.json next to them:

- cases: for each text, the ids from HF `tokenizers` (Python) with and without
  special tokens (the post-processor adds BOS), and the decodings of those ids
  (plain, and with special tokens skipped);
- chat: conversations rendered by transformers' `apply_chat_template` with the
  committed chat template, and the ids transformers gives that text (BOS is
  added by the tokenizer, not by the template).

The Rust test `encodings_match_hf_python_tokenizers` checks our tokenizer
reproduces every recorded value. The library versions used are recorded too.
Exit status: 0 written, 2 bad input (missing files).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tokenizers

DATA = Path(__file__).resolve().parent.parent / "crates/bitnet-models/tests/data/tokenizer"
TOKENIZER_JSON = DATA / "synthetic_512.tokenizer.json"
CONFIG_JSON = DATA / "synthetic_512.tokenizer_config.json"
OUT = DATA / "synthetic_512.crosscheck.json"

TEXTS = [
    "",
    "hello",
    "Hello, world! The robot counted 12345 coins.",
    "The little robot walked to the market on Tuesday morning.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "We're sure it's fine; DON'T WORRY, they'll say. I'M HERE, YOU'VE SEEN.",
    "unicode: h\u00e9llo w\u00f6rld, \u65e5\u672c\u8a9e, emoji \U0001f980\U0001f44d\U0001f3fd, \u211d\u00b3, \ufb01 ligature",
    'fn main() { println!("{}", 1 + 2); }',
    "def f(x):\n    return x ** 2  # square\n",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 2024-06-18",
    "special <|eot_id|> inside<|begin_of_text|>text<|end_of_text|>",
    "broken special <|eot_id| and <|reserved_special_token_0|> <|start_header_id|>user<|end_header_id|>",
    "\x00\x01\x7f\u00ad\u00a0 control bytes",
    "   \n\n   \t ",
    "a" * 40 + " " + "the " * 10,
]

CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to 3."},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  padded \n"}],
]


def main() -> int:
    if not TOKENIZER_JSON.exists() or not CONFIG_JSON.exists():
        print(f"missing {TOKENIZER_JSON} or {CONFIG_JSON}; run the Rust test with "
              "BITNET_UPDATE_TOKENIZER_DATA=1 first", file=sys.stderr)
        return 2
    tok = tokenizers.Tokenizer.from_file(str(TOKENIZER_JSON))
    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        ids_special = tok.encode(text, add_special_tokens=True).ids
        cases.append({
            "text": text,
            "ids": ids,
            "ids_with_special_tokens": ids_special,
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids_special, skip_special_tokens=True),
        })

    versions = {"tokenizers": tokenizers.__version__}
    chats = []
    try:
        import transformers
    except ImportError:
        print("transformers not installed: chat cases skipped", file=sys.stderr)
    else:
        versions["transformers"] = transformers.__version__
        config = json.loads(CONFIG_JSON.read_text())
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(TOKENIZER_JSON),
            bos_token=config["bos_token"],
            eos_token=config["eos_token"],
            clean_up_tokenization_spaces=config["clean_up_tokenization_spaces"],
        )
        fast.chat_template = config["chat_template"]
        for messages in CHATS:
            rendered = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            chats.append({
                "messages": messages,
                "rendered": rendered,
                "ids": fast(rendered)["input_ids"],
            })

    OUT.write_text(json.dumps({"versions": versions, "cases": cases, "chat": chats},
                              ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases, {len(chats)} chats ({versions})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
