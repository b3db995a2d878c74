#!/usr/bin/env python3
"""Drive a running herd API with the official `openai` client and check what it returns.

Usage: check_serve.py --base-url http://127.0.0.1:8000/v1 --model NAME [--api-key KEY]

Exits non-zero with a message on the first failed check. Run by coordinator/tests/openai_client.rs
against `herd serve`; also useful by hand against any herd cluster.
"""
import argparse
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def expect_error(kind, status, fn, what):
    try:
        fn()
    except kind as e:
        check(e.status_code == status, f"{what}: HTTP {e.status_code} (want {status})")
        body = e.body if isinstance(e.body, dict) else {}
        check("message" in body, f"{what}: OpenAI error envelope ({body})")
        return e
    check(False, f"{what}: expected {kind.__name__}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default="none")
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)
    greedy = dict(temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]

    models = client.models.list()
    check(any(m.id == a.model for m in models.data), f"models.list has {a.model}")

    chat = client.chat.completions.create(model=a.model, messages=messages, **greedy)
    text = chat.choices[0].message.content
    check(isinstance(text, str) and chat.choices[0].message.role == "assistant", "chat returns an assistant message")
    check(chat.choices[0].finish_reason == "length", "chat finish_reason is length with ignore_eos")
    check(chat.usage.completion_tokens == 16 and chat.usage.total_tokens == chat.usage.prompt_tokens + 16, "chat usage")
    again = client.chat.completions.create(model=a.model, messages=messages, **greedy)
    check(again.choices[0].message.content == text, "greedy chat is deterministic")

    stream = client.chat.completions.create(
        model=a.model, messages=messages, stream=True, stream_options={"include_usage": True}, **greedy
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    check("".join(pieces) == text, "streamed chat equals the non-streamed text")
    check(finish == "length" and usage is not None and usage.completion_tokens == 16, "stream ends with finish_reason and usage")

    two = client.chat.completions.create(model=a.model, messages=messages, n=2, temperature=0.8, seed=7, max_tokens=8)
    check(len(two.choices) == 2 and [c.index for c in two.choices] == [0, 1], "n=2 returns two choices")

    comp = client.completions.create(model=a.model, prompt="Once upon a time", **greedy)
    check(isinstance(comp.choices[0].text, str) and comp.usage.completion_tokens == 16, "completions")
    cstream = client.completions.create(model=a.model, prompt="Once upon a time", stream=True, **greedy)
    check("".join(ch.choices[0].text for ch in cstream if ch.choices) == comp.choices[0].text, "streamed completion text")

    lp = client.chat.completions.create(model=a.model, messages=messages, logprobs=True, top_logprobs=2, **greedy)
    content = lp.choices[0].logprobs.content
    check(len(content) == 16 and all(len(c.top_logprobs) == 2 for c in content), "chat logprobs: one entry per token, 2 alternatives")
    check(all(c.token == c.top_logprobs[0].token and c.logprob <= 0 for c in content), "greedy token is the top logprob")
    check(lp.choices[0].message.content == text, "logprobs do not change the greedy text")
    clp = client.completions.create(model=a.model, prompt="Once upon a time", logprobs=1, **greedy)
    check(len(clp.choices[0].logprobs.tokens) == 16 and len(clp.choices[0].logprobs.text_offset) == 16, "completion logprobs")

    stopped = client.chat.completions.create(model=a.model, messages=messages, stop=[text[2:4]] if len(text) > 4 else None, **greedy)
    check(stopped.choices[0].message.content is not None, "stop strings accepted")

    expect_error(openai.NotFoundError, 404, lambda: client.chat.completions.create(model="no-such-model", messages=messages), "unknown model")
    expect_error(
        openai.BadRequestError,
        400,
        lambda: client.chat.completions.create(model=a.model, messages=messages, top_p=2.0),
        "top_p out of range",
    )
    e = expect_error(
        openai.BadRequestError,
        400,
        lambda: client.chat.completions.create(model=a.model, messages=[{"role": "user", "content": "word " * 20000}]),
        "prompt too long",
    )
    check(e.code == "context_length_exceeded", f"prompt too long has code context_length_exceeded ({e.code})")
    expect_error(openai.BadRequestError, 400, lambda: client.chat.completions.create(model=a.model, messages=[]), "empty messages")
    if a.api_key != "none":
        bad = openai.OpenAI(base_url=a.base_url, api_key="wrong", max_retries=0)
        expect_error(openai.AuthenticationError, 401, lambda: bad.models.list(), "wrong API key")
    print("all checks passed")


if __name__ == "__main__":
    main()
