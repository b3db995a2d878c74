#!/usr/bin/env python3
"""Send images to a running herd API with the official `openai` client and check the answers.

Usage: check_vision.py --base-url http://127.0.0.1:8000/v1 --model NAME --case testdata/golden/vision
       [--max-images N]

The case directory is a golden multimodal case (tools/golden/make_golden_vision.py): its images are sent as
base64 data URLs and the prompt token counts are checked against transformers' expected.json (the exact ids and
logits are checked by `herd eval` in coordinator/tests/golden.rs).
Malformed images (truncated file, wrong magic, a header declaring a huge canvas, too many images, a remote URL)
must each get a 400 in the OpenAI envelope while the server keeps serving. Exits non-zero on the first failure.
Run by coordinator/tests/openai_vision.rs against `herd serve`.
"""
import argparse
import base64
import json
import struct
import sys
import zlib
from pathlib import Path

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def expect_400(fn, what, fragment):
    try:
        fn()
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(e.status_code == 400 and "message" in body, f"{what}: 400 in the OpenAI envelope")
        check(fragment in body.get("message", ""), f"{what}: message mentions {fragment!r} ({body.get('message')!r})")
        return
    check(False, f"{what}: expected a 400")


def data_url(raw: bytes, mime="image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(raw).decode()}"}}


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with a token IDAT."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--case", required=True, type=Path)
    p.add_argument("--max-images", type=int, default=8, help="the server's --max-images-per-request")
    a = p.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key="none", max_retries=0, timeout=120)
    expected = {e["name"]: e for e in json.loads((a.case / "expected.json").read_text())["prompts"]}
    n_new = json.loads((a.case / "input.json").read_text())["max_new_tokens"]
    image = lambda name: (a.case / "images" / f"{name}.png").read_bytes()  # noqa: E731
    greedy = dict(temperature=0, max_tokens=n_new, extra_body={"ignore_eos": True})

    def chat(content, system=None, **kw):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return client.chat.completions.create(model=a.model, messages=messages, **{**greedy, **kw})

    one = chat([data_url(image("wide")), {"type": "text", "text": "Describe this image."}])
    e = expected["one_wide_image"]
    check(one.usage.prompt_tokens == len(e["input_ids"]), f"one image: {one.usage.prompt_tokens} prompt tokens (image block expanded)")
    check(one.usage.completion_tokens == n_new, "one image: completion length")
    text = one.choices[0].message.content
    check(isinstance(text, str), "one image: an assistant message")
    other = chat([data_url(image("small")), {"type": "text", "text": "Describe this image."}])
    check(other.choices[0].message.content != text, "another image gives another greedy text (the pixels are used)")

    two = chat(
        [{"type": "text", "text": "Compare "}, data_url(image("small")), {"type": "text", "text": " with "},
         data_url(image("tall")), {"type": "text", "text": "."}],
        system="You are a helpful assistant.",
    )
    e = expected["two_images_system"]
    check(two.usage.prompt_tokens == len(e["input_ids"]), "two images in one message: prompt tokens")
    check(two.usage.completion_tokens == n_new, "two images: completion length")

    wide = image("wide")
    expect_400(lambda: chat([data_url(wide[: len(wide) // 2])]), "truncated PNG", "cannot be decoded")
    expect_400(lambda: chat([data_url(b"this is not an image at all")]), "wrong magic", "not an image")
    expect_400(lambda: chat([data_url(png_bomb(100_000, 100_000))]), "header declaring 10^10 pixels", "limit")
    expect_400(lambda: chat([data_url(wide)] * (a.max_images + 1)), "too many images", "at most")
    expect_400(
        lambda: chat([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]),
        "remote URL",
        "remote",
    )
    again = chat([data_url(image("wide")), {"type": "text", "text": "Describe this image."}])
    check(again.choices[0].message.content == text, "the server keeps serving after bad images")
    print("all vision checks passed")


if __name__ == "__main__":
    main()
