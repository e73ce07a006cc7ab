"""What the SDKs send besides the fields that change an answer: storage and routing fields, a message's author
name, a reply sent back as it came (model_dump()), a model looked up by id, a route that does not exist, and no
max_tokens at all. A real server process and the official openai client."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from test_server import Server

import tiny

pytestmark = pytest.mark.backend

HI = [{"role": "user", "content": "hi"}]
SMALL = dict(max_tokens=16, seed=4, extra_body={"max_denoising_steps": 2, "cache_prompt": False})


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()


def test_a_model_by_id_and_routes_that_do_not_exist(server):
    c = server.client()
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found"
    for method, path in (("GET", "/v1/nothing"), ("POST", "/v1/responses-not"), ("GET", "/v1/chat/completions")):
        req = urllib.request.Request(server.url + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        body = json.load(e.value)
        assert e.value.code in (404, 405) and set(body["error"]) == {"message", "type", "param", "code"}, body


def test_storage_and_routing_fields_are_accepted_and_change_nothing(server):
    """Before, store, metadata, service_tier, prompt_cache_key and safety_identifier were 400 'unknown field'."""
    c = server.client()
    plain = c.chat.completions.create(model="tiny", messages=HI, **SMALL)
    tagged = c.chat.completions.create(model="tiny", messages=HI, store=False, metadata={"app": "x"},
                                       service_tier="auto", prompt_cache_key="k1", safety_identifier="u1",
                                       user="someone", **SMALL)
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HI, metadata="x", **SMALL)
    assert e.value.body["param"] == "metadata"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HI, verbosity="low", **SMALL)
    assert e.value.body["param"] == "verbosity" and "prompt" in e.value.body["message"]


def test_a_named_message_and_a_reply_sent_back_as_it_came(server):
    """langchain names a HumanMessage; an app sends back the assistant message it got (model_dump(): refusal,
    annotations, audio and function_call all null). Before, each was a 400."""
    c = server.client()
    first = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi", "name": "ann"}],
                                      **SMALL)
    assert first.choices[0].message.content == c.chat.completions.create(model="tiny", messages=HI,
                                                                         **SMALL).choices[0].message.content
    back = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= set(back)
    again = c.chat.completions.create(model="tiny", messages=HI + [back, {"role": "user", "content": "more"}],
                                      **SMALL)
    assert again.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):  # a value where a reply has none is still refused
        c.chat.completions.create(model="tiny", messages=HI + [dict(back, refusal="no")], **SMALL)


def test_without_max_tokens_an_answer_may_fill_the_context(server):
    """Before, a request without max_tokens (pydantic-ai, langchain and openai-agents send none) was cut at the
    default of one canvas with finish_reason 'length'. Now it runs to its end or to the slot's context: with
    ignore_eos, exactly the canvases the context has room for after the prompt."""
    c = server.client()
    r = c.chat.completions.create(model="tiny", messages=HI, seed=5,
                                  extra_body={"max_denoising_steps": 1, "ignore_eos": True})
    n_ctx, C = 1024, tiny.CANVAS  # -c 2048 over two slots
    room = (n_ctx - r.usage.prompt_tokens) // C * C
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"


def test_n_choices_each_with_its_own_seed(server):
    """`n` > 1 (before: a 400): a choice per generation, batched in the slots' forwards; choice 0 is the answer
    of n=1 with the same seed, choice k the answer of the seed derived from (seed, k); streaming names each
    choice's index; usage counts the prompt once."""
    from dglocal.generation.request import derive_seed

    c = server.client()
    opts = dict(max_tokens=16, extra_body={"max_denoising_steps": 2, "cache_prompt": False})
    many = c.chat.completions.create(model="tiny", messages=HI, n=3, seed=7, **opts)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    alone = [c.chat.completions.create(model="tiny", messages=HI, seed=s, **opts).choices[0].message.content
             for s in (7, derive_seed(7, 1), derive_seed(7, 2))]
    assert [ch.message.content for ch in many.choices] == alone
    one = c.chat.completions.create(model="tiny", messages=HI, seed=7, **opts)
    assert many.usage.prompt_tokens == one.usage.prompt_tokens
    assert many.usage.completion_tokens == sum(c.chat.completions.create(
        model="tiny", messages=HI, seed=s, **opts).usage.completion_tokens for s in (7, derive_seed(7, 1), derive_seed(7, 2)))
    chunks = list(c.chat.completions.create(model="tiny", messages=HI, n=3, seed=7, stream=True,
                                            stream_options={"include_usage": True}, **opts))
    streamed = {k: "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == k)
                for k in range(3)}
    assert [streamed[k] for k in range(3)] == alone
    assert chunks[-1].usage.completion_tokens == many.usage.completion_tokens
    comp = c.completions.create(model="tiny", prompt="Once", n=2, seed=7, **opts)
    assert [ch.index for ch in comp.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="a", suffix="b", n=2, **opts)
    assert e.value.body["param"] == "n"
