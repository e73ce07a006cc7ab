"""What apps ask of `dglocal serve`: tool calls, reasoning, structured output, sampling knobs and /metrics,
through a real server process and the official `openai` client."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from test_server import Server
from test_structured import schema

pytestmark = pytest.mark.backend

BUDGET = dict(max_tokens=300, extra_body={"max_denoising_steps": 12})
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "4096", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()


def body(**kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "max_tokens": 300, "max_denoising_steps": 12, **kw}


PINNED = ('root ::= "<|tool_call>call:get_weather{city:<|\\"|>Paris \\"centre\\"\\n<|\\"|>,days:3,'
          'opts:{units:[<|\\"|>C<|\\"|>,true,null,-1.5e3]}}<tool_call|><|tool_call>call:get_time{}<tool_call|>"')


def test_tool_calls_parse_stream_equals_whole(server):
    """The reply pinned (a grammar) to two calls in Gemma 4's syntax, nested arguments and a string with quotes
    and a newline: message.tool_calls and, streaming, delta.tool_calls carry the same structure."""
    c = server.client()
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, CLOCK],
              seed=5, max_tokens=300, extra_body={"grammar": PINNED, "max_denoising_steps": 12})
    whole = c.chat.completions.create(**kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = [(t.function.name, json.loads(t.function.arguments)) for t in choice.message.tool_calls]
    assert calls == [("get_weather", {"city": 'Paris "centre"\n', "days": 3, "opts": {"units": ["C", True, None, -1500.0]}}),
                     ("get_time", {})]
    assert all(t.id and t.type == "function" for t in choice.message.tool_calls)
    chunks = list(c.chat.completions.create(stream=True, **kw))
    deltas = [t for ch in chunks if ch.choices for t in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(k, n, a) for k, (n, a) in enumerate(calls)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)


def test_named_and_required_tool_choice_force_a_call(server):
    """tool_choice names a function, or is "required": the reply is constrained to calls (a grammar built from
    the tools' names and parameters)."""
    c = server.client()
    for choice, tools in (({"type": "function", "function": {"name": "get_time"}}, [WEATHER, CLOCK]),
                          ("required", [CLOCK])):
        kw = dict(model="tiny", messages=[{"role": "user", "content": "Time?"}], tools=tools, tool_choice=choice,
                  seed=9, **BUDGET)
        whole = c.chat.completions.create(**kw)
        assert whole.choices[0].finish_reason == "tool_calls", whole
        assert {t.function.name for t in whole.choices[0].message.tool_calls} == {"get_time"}
        chunks = list(c.chat.completions.create(stream=True, **kw))
        names = [t.function.name for ch in chunks if ch.choices for t in (ch.choices[0].delta.tool_calls or [])]
        assert names == [t.function.name for t in whole.choices[0].message.tool_calls]


def test_tool_results_in_the_history_are_rendered(server):
    """An assistant turn with tool_calls and the tool's result: accepted and folded into the model's turn."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris \"centre\"\nFR"})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp_c": 21})}]
    out = server.client().chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], seed=2,
                                                  max_tokens=16, extra_body={"max_denoising_steps": 4})
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert out.usage.prompt_tokens > 40


def test_json_schema_response_format_validates(server):
    c = server.client()
    for i in range(6):
        s = schema(200 + i)
        out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "t", "schema": s}},
                                        seed=i, **BUDGET)
        jsonschema.validate(json.loads(out.choices[0].message.content), s)
    # any object: keys and strings without bounds, which a random-weights model does not close within a
    # budget; what it wrote is the start of an object, and a reply that ended is one
    out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], seed=1,
                                    response_format={"type": "json_object"}, max_tokens=48)
    text = out.choices[0].message.content
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_grammar_fields_of_llama_server_and_vllm(server):
    cases = [(dict(grammar='root ::= "id-" [0-9]{3}'), r"id-\d{3}"),
             (dict(structured_outputs={"regex": r"[a-c]{2}\d"}), r"[a-c]{2}\d"),
             (dict(guided_choice=["alpha", "beta gamma"]), r"alpha|beta gamma"),
             (dict(json_schema={"enum": ["x", "y"]}), r'"x"|"y"')]
    for k, (fields, rx) in enumerate(cases):
        status, out, _ = server.post("/v1/chat/completions", json.dumps(body(seed=k, **fields)))
        assert status == 200, out
        assert re.fullmatch(rx, out["choices"][0]["message"]["content"]), (fields, out)
    status, out, _ = server.post("/v1/completions", json.dumps(
        {"model": "tiny", "prompt": "n:", "regex": r"\d{2}", "max_tokens": 40, "seed": 1}))
    assert status == 400 and out["error"]["param"] == "regex"  # unknown on completions too: named


@pytest.mark.parametrize("fields, param, words", [
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"type": "string", "format": "made-up"}}}}}), "response_format",
     "format"),
    (dict(response_format={"type": "yaml"}), "response_format", "json_object"),
    (dict(grammar='root ::= "a"', response_format={"type": "json_object"}), "grammar", "one"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools", "name"),
    # forced calls with response_format answer with calls (tests/test_tool_calls.py); a raw grammar cannot join them
    (dict(tools=[WEATHER], tool_choice="required", grammar='root ::= "a"'), "tool_choice", "cannot be combined"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "[0, 20]"),
    (dict(top_p=0), "top_p", "top_p"),
    (dict(temperature=3), "temperature", "temperature"),
    (dict(chat_template_kwargs={"messages": []}), "chat_template_kwargs", "messages"),
])
def test_app_fields_misused_are_named_400s(server, fields, param, words):
    status, out, _ = server.post("/v1/chat/completions", json.dumps(body(**fields)))
    assert status == 400, out
    assert out["error"]["param"] == param and words in out["error"]["message"], out


def test_sampling_knobs_and_thinking_are_accepted(server):
    c = server.client()
    for kw in (dict(temperature=0), dict(temperature=0.7, top_p=0.9, extra_body={"top_k": 20}),
               dict(extra_body={"min_p": 0.1}), dict(extra_body={"chat_template_kwargs": {"enable_thinking": True}})):
        kw = {"max_tokens": 16, **kw, "extra_body": {"max_denoising_steps": 4, **kw.get("extra_body", {})}}
        out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=3, **kw)
        assert out.choices[0].finish_reason in ("stop", "length")
    # temperature 0: the draw is the argmax, so the answer does not depend on the seed's uniforms... but the
    # canvas still starts from the seed's noise; the same seed gives the same answer
    a, b = (c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], seed=8,
                                      temperature=0, max_tokens=16, extra_body={"max_denoising_steps": 4})
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def scrape(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_add_up_under_load(tiny_f32_gguf):
    """8 clients x 3 requests, /metrics scraped while they run: the counters add up to what was sent."""
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1")
    try:
        c = s.client()
        seen: list[dict] = []

        def client(i):
            usage = []
            for k in range(3):
                out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"n {i}"}],
                                                seed=10 * i + k, max_tokens=20,
                                                extra_body={"max_denoising_steps": 4})
                usage.append(out)
                seen.append(scrape(s))
            return usage
        with ThreadPoolExecutor(8) as pool:
            outs = [o for part in pool.map(client, range(8)) for o in part]
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], top_p=0)
        m = scrape(s)
        assert m['dglocal_requests_total{status="200"}'] == 24
        assert m['dglocal_requests_total{status="400"}'] == 1
        assert m["dglocal_generation_tokens_total"] == sum(o.usage.completion_tokens for o in outs)
        assert m["dglocal_prompt_tokens_total"] == sum(o.usage.prompt_tokens for o in outs)
        steps = sum(o.model_extra["dglocal"]["steps"] for o in outs)
        assert m["dglocal_denoise_steps_total"] == steps == m["dglocal_step_seconds_count"]
        assert m["dglocal_denoise_steps_per_canvas_sum"] == steps
        assert m["dglocal_canvases_total"] == m["dglocal_denoise_steps_per_canvas_count"] == \
            sum(len(o.model_extra["dglocal"]["steps_per_canvas"]) for o in outs)
        assert m["dglocal_slots"] == 2 and m["dglocal_slots_busy"] == 0 and m["dglocal_queue_length"] == 0
        assert max(x["dglocal_slots_busy"] for x in seen) >= 1
        cached = sum(o.model_extra["dglocal"]["prompt_tokens_cached"] for o in outs)
        assert m["dglocal_prompt_tokens_cached_total"] == cached
    finally:
        s.stop()
