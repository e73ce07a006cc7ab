"""ollama's API (dglocal/serving/ollama.py) as apps use it: a real `dglocal serve` process on 127.0.0.1 and the
official `ollama` Python client. An answer is the one the OpenAI routes give for the same request."""

from __future__ import annotations

import json
import time
import urllib.request
from importlib.metadata import version
from types import SimpleNamespace

import jsonschema
import pytest

from test_server import Server
from test_structured import schema

from dglocal.generation.events import Completion, Stats
from dglocal.serving.ollama import Reply, messages

ollama = pytest.importorskip("ollama")

pytestmark = pytest.mark.backend

SMALL = {"num_predict": 16, "max_denoising_steps": 4}
# the prompt encoded afresh: answers compared across routes are exact (with prefix reuse, where keys sit in the
# cache moves attention's rounding, and a random-weight model's draws flip on the last bit)
FRESH = {**SMALL, "cache_prompt": False}
SEA = [{"role": "user", "content": "Write a line about the sea."}]


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()


def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


def openai(server, path: str, **body) -> dict:
    """The OpenAI route's answer for the same request, FRESH."""
    status, out, _ = server.post(path, json.dumps({"model": "tiny", "max_tokens": 16, "max_denoising_steps": 4,
                                                   "cache_prompt": False, **body}))
    assert status == 200, out
    return out


def joined(parts, field: str = "content") -> str:
    """The deltas of a stream put together: /api/chat's message.content (or .thinking), /api/generate's response."""
    return "".join(getattr(p if field == "response" else p.message, field) or "" for p in parts)


def test_tags_ps_show_and_version(server, tiny_f32_gguf):
    c = client(server)
    [m] = c.list().models
    assert m.model == "tiny:latest" and m.size == tiny_f32_gguf.stat().st_size and len(m.digest) == 64
    assert (m.details.format, m.details.family, m.details.quantization_level) == ("gguf", "diffusion-gemma", "F32")
    assert m.details.parameter_size.endswith("K")  # the tiny model: some hundred thousand parameters
    [p] = c.ps().models
    assert p.model == "tiny:latest" and p.digest == m.digest and p.context_length == 1024  # -c 2048 over 2 slots
    assert p.size > 0 and p.expires_at.year == 9999
    shown = c.show("tiny")
    assert {"completion", "tools", "thinking", "insert"} <= set(shown.capabilities)
    assert "vision" not in shown.capabilities  # no --mmproj
    assert "<|turn>" in shown.template and "num_ctx 1024" in shown.parameters
    assert shown.modelinfo["general.architecture"] == "diffusion-gemma"
    assert shown.modelinfo["tokenizer.ggml.tokens"] is None  # the vocabulary only when verbose
    assert c.show("tiny:latest").modelfile == shown.modelfile
    got = json.load(urllib.request.urlopen(server.url + "/api/version", timeout=30))
    assert got == {"version": version("dglocal")}


def test_chat_streamed_and_whole_are_the_openai_answer(server):
    c = client(server)
    want = openai(server, "/v1/chat/completions", messages=SEA, seed=3)
    whole = c.chat("tiny", SEA, options={**FRESH, "seed": 3})
    parts = list(c.chat("tiny", SEA, options={**FRESH, "seed": 3}, stream=True))
    assert whole.message.role == "assistant" and whole.done and whole.model == "tiny"
    assert whole.message.content == joined(parts) == want["choices"][0]["message"]["content"]
    assert whole.done_reason == want["choices"][0]["finish_reason"]  # "length": 16 tokens of random weights
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and len(parts) >= 2
    last = parts[-1]
    assert last.message.content == "" and last.done_reason == whole.done_reason
    for r in (whole, last):
        assert r.prompt_eval_count == want["usage"]["prompt_tokens"] and r.eval_count == 16
        assert r.total_duration >= r.eval_duration > 0 and r.load_duration == 0 and r.created_at.endswith("Z")


def test_generate_through_the_template_raw_and_with_a_suffix(server):
    c = client(server)
    cases = [  # ollama's body, the OpenAI route and body that answer it
        (dict(prompt="Tell me a story.", system="Be brief."), "/v1/chat/completions",
         dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}])),
        (dict(prompt="Once upon a time", raw=True), "/v1/completions", dict(prompt="Once upon a time")),
        (dict(prompt="def add(a, b):\n", suffix="\n    return c\n"), "/v1/completions",
         dict(prompt="def add(a, b):\n", suffix="\n    return c\n")),
    ]
    for k, (body, path, fields) in enumerate(cases):
        want = openai(server, path, seed=k, **fields)["choices"][0]
        whole = c.generate("tiny", options={**FRESH, "seed": k}, **body)
        parts = list(c.generate("tiny", options={**FRESH, "seed": k}, stream=True, **body))
        text = want["message"]["content"] if "message" in want else want["text"]
        assert whole.response == joined(parts, "response") == text, body
        assert whole.done and parts[-1].done and whole.context is None
        assert whole.done_reason == ("length" if want["finish_reason"] == "length" else "stop")


def test_format_json_and_a_json_schema(server):
    c = client(server)
    for i in range(3):
        s = schema(300 + i)
        out = c.chat("tiny", [{"role": "user", "content": "JSON please"}], format=s,
                     options={"num_predict": 160, "max_denoising_steps": 8, "seed": i})
        assert out.done_reason == "stop", out
        jsonschema.validate(json.loads(out.message.content), s)
    out = c.generate("tiny", "x", format="json", options={**SMALL, "seed": 1})
    assert out.response.startswith("{")


def test_seed_repeats_and_temperature_zero(server):
    c = client(server)
    ask = lambda **o: c.chat("tiny", [{"role": "user", "content": "hi"}], options={**SMALL, **o}).message.content
    assert ask(seed=7) == ask(seed=7) != ask(seed=8)
    assert ask(seed=7, temperature=0) == ask(seed=7, temperature=0)
    assert ask(seed=7, top_k=20, top_p=0.9, min_p=0.05, stop=["\n\n"], num_thread=4, use_mmap=True, num_ctx=1024,
               repeat_penalty=1.0, presence_penalty=0)  # runtime-only options and neutral values: accepted


def test_tools_thinking_and_tool_results_are_accepted(server):
    def get_time(tz: str) -> str:
        """The time of day.

        Args:
          tz: a time zone, like UTC
        """
        return "noon"

    c = client(server)
    plain = c.chat("tiny", [{"role": "user", "content": "Time?"}], options=SMALL)
    out = c.chat("tiny", [{"role": "user", "content": "Time?"}], tools=[get_time], options=SMALL)
    assert out.done and out.prompt_eval_count > plain.prompt_eval_count + 10  # the declaration is in the prompt
    thought = c.chat("tiny", [{"role": "user", "content": "Time?"}], think=True, options=SMALL)
    assert thought.done and thought.prompt_eval_count > plain.prompt_eval_count  # the system turn with <|think|>
    history = [{"role": "user", "content": "Time?"},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_time",
                                                                                 "arguments": {"tz": "UTC"}}}]},
               {"role": "tool", "content": "noon", "tool_name": "get_time"}]
    assert c.chat("tiny", history, tools=[get_time], options=SMALL).done


def fake_reply(text: str) -> tuple[Reply, Completion]:
    frontend = SimpleNamespace(sudoku=False, template=object(), answer=lambda c: c.text,
                               finish=lambda c, prompt, calls=None: "tool_calls" if calls else "stop")
    req = SimpleNamespace(id="r", slot=0, cached=0, plan=SimpleNamespace(tokens=[2, 5, 9]))
    reply = Reply(frontend, req, SimpleNamespace(shape={"chat": True, "calls": True}),
                  "tiny", chat=True, started=time.monotonic_ns())
    stats = Stats(prompt_tokens=3, prefilled_tokens=3, generated_tokens=4, canvases=1, steps_per_canvas=[4],
                  tokens_per_forward=1.0, ms_per_step=1.0, tokens_per_second=1.0, time_to_first_token=0.1,
                  prefill_seconds=0.01, total_seconds=0.02)
    return reply, Completion(text, [7] * 4, "eos", stats)


def test_a_reply_in_ollamas_shape_thinking_and_calls_with_object_arguments():
    """The reply's channels (Gemma 4's syntax) as ollama's message: thinking, content, tool calls whose
    arguments are objects; streamed, the same pieces in the deltas and a final object with empty content."""
    text = '<|channel>thought\nhmm<channel|>Sure.<|tool_call>call:get_time{tz:<|"|>UTC<|"|>,n:2}<tool_call|>'
    reply, c = fake_reply(text)
    whole = ollama.ChatResponse(**reply.whole(c))
    assert (whole.message.thinking, whole.message.content) == ("hmm", "Sure.")
    [call] = whole.message.tool_calls
    assert (call.function.name, call.function.arguments) == ("get_time", {"tz": "UTC", "n": 2})
    assert whole.done and whole.done_reason == "stop" and whole.eval_count == 4 and whole.prompt_eval_count == 3
    reply, c = fake_reply(text)
    objs = [o for k in range(0, len(text), 7) if (o := reply.block(text[k:k + 7])) is not None] + reply.end(c)
    parts = [ollama.ChatResponse(**o) for o in objs]
    assert (joined(parts, "thinking"), joined(parts)) == ("hmm", "Sure.")
    assert [t.function.arguments for p in parts for t in p.message.tool_calls or ()] == [{"tz": "UTC", "n": 2}]
    assert parts[-1].done and parts[-1].message.content == "" and not any(p.done for p in parts[:-1])


def test_messages_become_openai_messages():
    """Images as data: URL parts before the text, call arguments as JSON text with ids that tie each result to its
    call: a result without tool_name answers the next call of the turn before it."""
    got = messages([
        {"role": "user", "content": "Both?", "images": ["aGk=\n"]},
        {"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1}}}, {"function": {"name": "b", "arguments": {}}}]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2", "tool_name": "b"}])
    assert got == [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
                                     {"type": "text", "text": "Both?"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1_0", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
            {"id": "call_1_1", "type": "function", "function": {"name": "b", "arguments": "{}"}}]},
        {"role": "tool", "content": "1", "tool_call_id": "call_1_0"},
        {"role": "tool", "content": "2", "name": "b"}]


def test_loading_only_answers_at_once(server):
    c = client(server)
    assert c.generate("tiny").done_reason == "load"
    assert c.chat("tiny", [], keep_alive="5m").done_reason == "load"


def raw(c, path: str, body: dict):
    """A body the client's own types would refuse to send, through its error handling."""
    return c._request_raw("POST", path, json=body)


@pytest.mark.parametrize("call, status, words", [
    (lambda c: c.chat("nope", SEA), 404, "model 'nope' not found"),
    (lambda c: list(c.generate("nope:7b", "x", stream=True)), 404, "model 'nope:7b' not found"),
    (lambda c: c.show("nope"), 404, "model 'nope' not found"),
    (lambda c: c.chat("tiny", SEA, options={"repeat_penalty": 1.3}), 400, "repeat_penalty"),
    (lambda c: c.chat("tiny", SEA, options={"num_ctx": 8192}), 400, "num_ctx"),
    (lambda c: c.chat("tiny", SEA, options={"bogus": 1}), 400, "bogus"),
    (lambda c: c.generate("tiny", "x", options={"num_predict": 0}), 400, "num_predict"),
    (lambda c: c.generate("tiny", "x", options={"temperature": 9}), 400, "temperature"),
    (lambda c: c.generate("tiny", "x", template="{{ .Prompt }}"), 400, "template"),
    (lambda c: raw(c, "/api/generate", {"model": "tiny", "prompt": "x", "format": "yaml"}), 400, "format"),
    (lambda c: raw(c, "/api/chat", {"model": "tiny", "messages": SEA, "suffix": "x"}), 400, "suffix"),
    (lambda c: c.generate("tiny", "x", think="high"), 400, "think"),
    (lambda c: c.generate("tiny", "x", raw=True, system="s"), 400, "system"),
    (lambda c: c.chat("tiny", [{"role": "user", "content": "x", "images": ["%%"]}]), 400, "images[0]"),
    (lambda c: c.chat("tiny", [{"role": "user", "content": "x", "images": [b"not an image"]}]), 400, "image"),
    (lambda c: list(c.chat("tiny", SEA, options={"num_predict": 4000}, stream=True)), 400, "over n_ctx 1024"),
    (lambda c: c.pull("tiny"), 501, "one model"),
    (lambda c: c.embed("tiny", "x"), 501, "embeddings"),
])
def test_errors_have_ollamas_shape_and_name_the_field(server, call, status, words):
    with pytest.raises(ollama.ResponseError) as e:
        call(client(server))
    assert e.value.status_code == status and words in e.value.error, e.value


def test_a_client_that_leaves_frees_its_slot(server):
    """A stream whose reader stops after its first line: the request is cancelled (it never finishes, so it logs
    no line), and its slot is free within a second, long before the answer would have reached the context."""
    def ended() -> int:
        return sum("ollama " in line and "prompt" in line for line in server.log)

    before = ended()
    stream = client(server).chat("tiny", [{"role": "user", "content": "Go on forever."}], stream=True,
                                 options={"max_denoising_steps": 48, "ignore_eos": True, "seed": 1})
    assert not next(stream).done
    stream.close()  # the connection closes with it
    deadline = time.monotonic() + 5
    while any(s["busy"] for s in json.load(urllib.request.urlopen(server.url + "/slots", timeout=30))):
        assert time.monotonic() < deadline, "the slot is still busy"
        time.sleep(0.05)
    assert client(server).chat("tiny", SEA, options=SMALL).done  # the server keeps serving
    deadline = time.monotonic() + 5  # its log line, read from the process' output
    while ended() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended() == before + 1  # that one logged its line; the one that left never finished


@pytest.fixture(scope="module")
def vision_server(tiny_f32_gguf, tiny_mmproj):
    import tiny

    s = Server(str(tiny_f32_gguf), "-np", "1", "-c", "2048", "--alias", "tiny", "--seed", "1", "--mmproj",
               str(tiny_mmproj), "--image-tokens", str(tiny.MAX_SOFT_TOKENS))
    yield s
    s.stop()


def test_images_are_the_openai_image_parts(vision_server):
    from test_server_vision import data_url, png

    raw = png(40, 56, 0)
    want = openai(vision_server, "/v1/chat/completions", seed=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(raw)}}, {"type": "text", "text": "What is this?"}]}])
    c = client(vision_server)
    assert "vision" in c.show("tiny").capabilities
    out = c.chat("tiny", [{"role": "user", "content": "What is this?", "images": [raw]}],
                 options={**FRESH, "seed": 3})
    assert out.message.content == want["choices"][0]["message"]["content"]
    assert out.prompt_eval_count == want["usage"]["prompt_tokens"]
    said = c.generate("tiny", "What is this?", images=[raw], options={**FRESH, "seed": 3})
    assert said.response == out.message.content
