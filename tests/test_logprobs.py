"""Log-probabilities of the generated tokens (issue 40): the Python API's Completion.logprobs, and the server's
chat `logprobs` / `top_logprobs`, completions' `logprobs` and ollama's, whole, streamed and with n > 1, through a
real server and the official clients. The values themselves are the device's, checked against the reference in
tests/test_backend.py; here: each token is listed once with its own id, the lists are the tokens that the answer
holds, the most likely come first, and asking for them changes no answer."""

from __future__ import annotations

import math

import openai
import pytest
from test_server import Server

import tiny

pytestmark = pytest.mark.backend

HI = [{"role": "user", "content": "Say something."}]
SMALL = dict(max_tokens=40, seed=5, extra_body={"max_denoising_steps": 3, "cache_prompt": False})


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()


def test_the_api_lists_each_output_token(llama_model):
    llm = llama_model
    plain = llm.generate([2, 5, 9], max_new_tokens=2 * tiny.CANVAS, seed=3, eos_token_id=())
    c = llm.generate([2, 5, 9], max_new_tokens=2 * tiny.CANVAS, seed=3, eos_token_id=(), logprobs=3)
    assert c.tokens == plain.tokens and plain.logprobs is None  # asking changes nothing
    assert [e.token for e in c.logprobs] == c.tokens
    for e in c.logprobs:
        ids = [t for t, _ in e.top]
        values = [v for _, v in e.top]
        assert len(e.top) == 3 and values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert e.logprob is not None and e.logprob <= values[0] + 1e-6
        if e.token in ids:  # the same number, wherever it was read
            assert math.isclose(e.logprob, values[ids.index(e.token)], abs_tol=1e-5)


def test_chat_whole_streamed_and_n(server):
    c = server.client()
    plain = c.chat.completions.create(model="tiny", messages=HI, **SMALL)
    one = c.chat.completions.create(model="tiny", messages=HI, logprobs=True, top_logprobs=4, **SMALL)
    assert one.choices[0].message.content == plain.choices[0].message.content  # asking changes nothing
    assert len(one.choices[0].logprobs.content) == one.usage.completion_tokens
    r = c.chat.completions.create(model="tiny", messages=HI, logprobs=True, top_logprobs=4, n=2, **SMALL)
    for choice in r.choices:
        content = choice.logprobs.content
        assert content and all(len(t.top_logprobs) == 4 and t.logprob <= 0 for t in content)
        assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content)
    assert r.choices[0].logprobs.content != r.choices[1].logprobs.content
    whole = [(t.token, t.logprob) for t in one.choices[0].logprobs.content]
    chunks = list(c.chat.completions.create(model="tiny", messages=HI, logprobs=True, top_logprobs=4, stream=True,
                                            **SMALL))
    streamed = [(t.token, t.logprob) for ch in chunks if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]
    assert streamed == whole
    none = c.chat.completions.create(model="tiny", messages=HI, logprobs=True, **SMALL)
    assert all(t.top_logprobs == [] for t in none.choices[0].logprobs.content)


def test_completions_legacy_shape(server):
    r = server.client().completions.create(model="tiny", prompt="Once", logprobs=2, **SMALL)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp.top_logprobs)


@pytest.mark.parametrize("route, fields, param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": 3}, "logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"logprobs": 1, "suffix": "end."}, "logprobs"),
])
def test_bad_requests_name_the_field(server, route, fields, param):
    import json

    body = {"model": "tiny", "max_tokens": 8, **({"messages": HI} if "chat" in route else {"prompt": "x"}), **fields}
    status, out, _ = server.post(route, json.dumps(body))
    assert status == 400 and out["error"]["param"] == param, out


def test_ollama_logprobs(server):
    ollama = pytest.importorskip("ollama")
    c = ollama.Client(host=server.url, timeout=120)
    opts = {"num_predict": 24, "max_denoising_steps": 3, "seed": 2}
    out = c.chat("tiny", HI, options=opts, logprobs=True, top_logprobs=2)
    assert out.logprobs and all(len(t.top_logprobs) == 2 for t in out.logprobs)
    parts = list(c.chat("tiny", HI, options=opts, logprobs=True, top_logprobs=2, stream=True))
    assert [t.token for p in parts for t in (p.logprobs or [])] == [t.token for t in out.logprobs]
    raw = c.generate("tiny", "Once", raw=True, options=opts, logprobs=True)
    assert raw.logprobs and all(t.top_logprobs in (None, []) for t in raw.logprobs)


def test_openai_client_errors_are_400s(server):
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=HI, top_logprobs=3, **SMALL)
