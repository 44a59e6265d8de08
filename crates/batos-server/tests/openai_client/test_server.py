"""The official `openai` Python client against a running batos server.

Run by `tests/openai_client.rs` (which starts the server on a loopback port and sets
the environment below); it can also be pointed at any batos or vLLM server by hand:

    BATOS_BASE_URL=http://127.0.0.1:8000/v1 BATOS_MODEL=... BATOS_API_KEY=... \
    BATOS_ADMIN_KEY=... BATOS_ADAPTER_PATH=... python test_server.py

Environment: BATOS_BASE_URL (ends in /v1), BATOS_MODEL (the base model's name),
BATOS_API_KEY, BATOS_ADMIN_KEY, BATOS_ADAPTER_PATH (a lora_path the server accepts),
BATOS_PROMPT (a prompt the model's tokenizer encodes), BATOS_CHAT_TEXT (a user message).
Exits non-zero on the first failure.
"""

import json
import os
import sys
import traceback
import urllib.error
import urllib.request

import openai

BASE = os.environ["BATOS_BASE_URL"]
MODEL = os.environ["BATOS_MODEL"]
KEY = os.environ["BATOS_API_KEY"]
ADMIN = os.environ["BATOS_ADMIN_KEY"]
ADAPTER_PATH = os.environ["BATOS_ADAPTER_PATH"]
PROMPT = os.environ.get("BATOS_PROMPT", "Hello")
CHAT_TEXT = os.environ.get("BATOS_CHAT_TEXT", "Hello")
ADAPTER = "persona-a"

client = openai.OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=120)


class Reply:
    """Status and body of a plain HTTP answer (the admin routes are not in the client)."""

    def __init__(self, status_code, text):
        self.status_code = status_code
        self.text = text

    def json(self):
        return json.loads(self.text)


def admin(path, body):
    req = urllib.request.Request(
        BASE + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read().decode())


def model_ids():
    return [m.id for m in client.models.list().data]


def test_models_lists_the_base():
    ids = model_ids()
    assert ids[0] == MODEL, ids


def test_completion_streamed_and_not_agree():
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**args)
    assert full.object == "text_completion"
    assert full.model == MODEL
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8, full.usage
    text = full.choices[0].text
    assert text, full
    pieces = []
    usage = None
    for chunk in client.completions.create(
        stream=True, stream_options={"include_usage": True}, **args
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
    assert "".join(pieces) == text, (pieces, text)
    assert usage is not None and usage.completion_tokens == 8, usage


def test_chat_streamed_and_not_agree():
    args = dict(model=MODEL, messages=[{"role": "user", "content": CHAT_TEXT}],
                max_tokens=8, temperature=0, seed=1, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    content = full.choices[0].message.content
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(stream=True, **args):
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == content, (pieces, content)
    assert finish == "length", finish


def test_adapter_load_use_unload():
    r = admin("/load_lora_adapter", {"lora_name": ADAPTER, "lora_path": ADAPTER_PATH})
    assert r.status_code == 200, r.text
    assert r.text == f"Success: LoRA adapter '{ADAPTER}' added successfully.", r.text
    cards = {m.id: m for m in client.models.list().data}
    assert ADAPTER in cards, cards
    assert cards[ADAPTER].model_extra.get("parent") == MODEL, cards[ADAPTER]

    r = admin("/load_lora_adapter", {"lora_name": ADAPTER, "lora_path": ADAPTER_PATH})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "InvalidUserInput", r.text

    out = client.chat.completions.create(
        model=ADAPTER, messages=[{"role": "user", "content": CHAT_TEXT}], max_tokens=4)
    assert out.model == ADAPTER, out
    streamed = list(client.completions.create(
        model=ADAPTER, prompt=PROMPT, max_tokens=4, stream=True))
    assert streamed and all(c.model == ADAPTER for c in streamed)

    r = admin("/unload_lora_adapter", {"lora_name": ADAPTER})
    assert r.status_code == 200, r.text
    assert r.text == f"Success: LoRA adapter '{ADAPTER}' removed successfully.", r.text
    assert ADAPTER not in model_ids()
    try:
        client.completions.create(model=ADAPTER, prompt=PROMPT, max_tokens=2)
        raise AssertionError("a request for an unloaded adapter succeeded")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert "does not exist" in e.message, e.message

    r = admin("/unload_lora_adapter", {"lora_name": ADAPTER})
    assert r.status_code == 404, r.text


def test_errors_map_to_the_client_exceptions():
    bad = openai.OpenAI(base_url=BASE, api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    try:
        client.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert "n must be 1" in e.message, e.message


def main():
    tests = [(n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)]
    failed = 0
    for name, f in tests:
        try:
            f()
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{len(tests) - failed} passed, {failed} failed (openai {openai.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
