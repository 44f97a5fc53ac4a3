"""Drives a running `bitnet serve` with the official `openai` Python client:
a chat completion, a completion and a streamed chat. Exits non-zero (with an
assertion message) when any answer is malformed.

Usage: python3 openai_client_check.py --base-url http://127.0.0.1:PORT/v1 --model ID [--api-key KEY]
"""

import argparse
import sys

import openai


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="unused")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)

    models = client.models.list()
    assert [m.id for m in models.data] == [args.model], models

    chat = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=8,
        temperature=0,
    )
    assert chat.object == "chat.completion", chat
    assert chat.choices[0].message.role == "assistant", chat
    assert isinstance(chat.choices[0].message.content, str), chat
    assert chat.choices[0].finish_reason in ("stop", "length"), chat
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, chat
    assert 1 <= chat.usage.completion_tokens <= 8, chat

    completion = client.completions.create(model=args.model, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert completion.object == "text_completion", completion
    assert isinstance(completion.choices[0].text, str), completion
    assert completion.choices[0].finish_reason in ("stop", "length"), completion
    assert completion.usage.completion_tokens <= 6, completion

    stream = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "What is 2 + 2?"}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish = choice.finish_reason
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens >= 1, usage
    # Greedy decoding: the stream says what the non-streamed chat said.
    assert "".join(pieces) == chat_alone(client, args.model), pieces

    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        raise AssertionError("an unknown model was accepted")
    except openai.BadRequestError as err:
        assert err.status_code == 400, err

    print("openai client check: ok")
    return 0


def chat_alone(client: "openai.OpenAI", model: str) -> str:
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, temperature=0
    )
    return chat.choices[0].message.content


if __name__ == "__main__":
    sys.exit(main())
