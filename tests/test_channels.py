"""Gemma 4's channels through the GGUF's own chat template: every message shape the template writes (a call,
parallel calls, nested arguments, strings with quotes, newlines and braces, a tool response, a thought) is read
back by dglocal.generation.channels as the structure it was written from, whole and streamed in pieces."""

from __future__ import annotations

import json

import gguf
import pytest

from dglocal.generation import channels
from dglocal.generation.chat import ChatTemplate

TOOLS = [{"type": "function", "function": {"name": n, "description": "d", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}}}}}
    for n in ("get_weather", "search.web", "set-alarm")]

ARGUMENTS = [
    {"city": "Paris"},
    {"city": 'He said "hi", then {left}: [ok]\nnext line\ttab', "n": 3},
    {"q": "naïve café ☕", "opts": {"depth": [1, 2.5, -3e-05, True, False, None, {"k": "v", "e": []}],
                                  "empty": {}}},
    {},
    {"nested": {"a": {"b": {"c": ["x", ["y", {"z": "<|tool_call>"}]]}}}},
]


@pytest.fixture(scope="module")
def template(tiny_f32_gguf):
    field = gguf.GGUFReader(tiny_f32_gguf).fields["tokenizer.chat_template"]
    return ChatTemplate(bytes(field.parts[field.data[0]]).decode())


def model_turn(template, calls: list[tuple[str, dict]], *, content: str = "", after=None) -> str:
    """The text of the model's turn the template writes for an assistant message with `calls`."""
    assistant = {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"c{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for k, (name, args) in enumerate(calls)]}
    history = [{"role": "user", "content": "hi"}, assistant, *(after or [])]
    text = template.render(channels.template_messages(history), tools=TOOLS, add_generation_prompt=False)
    return text.split("<|turn>model\n", 1)[1]


def reply_of(turn: str) -> str:
    """What the model generates of its turn: up to the first tool response or the end of the turn."""
    return turn.split("<|tool_response>")[0].split("<turn|>")[0]


def streamed(text: str, size: int) -> tuple[str, str, channels.Output]:
    s = channels.StreamSplitter(tools=True)
    reasoning, content = "", ""
    for i in range(0, len(text), size):
        r, c = s.feed(text[i:i + size])
        reasoning, content = reasoning + r, content + c
    r, c, out = s.finish()
    return reasoning + r, content + c, out


def parsed(out: channels.Output) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in out.tool_calls]


@pytest.mark.parametrize("args", ARGUMENTS)
def test_a_call_reads_back_as_written(template, args):
    turn = reply_of(model_turn(template, [("get_weather", args)]))
    assert turn.startswith("<|tool_call>call:get_weather{")  # Gemma 4's syntax, from the template itself
    out = channels.split(turn)
    assert parsed(out) == [("get_weather", args)] and out.content == ""
    assert all(c.id.startswith("call_") for c in out.tool_calls)
    for size in (1, 3, 17):
        assert parsed(streamed(turn, size)[2]) == [("get_weather", args)]


def test_parallel_calls_and_the_text_around_them(template):
    calls = [("get_weather", ARGUMENTS[1]), ("search.web", ARGUMENTS[2]), ("set-alarm", {})]
    turn = reply_of(model_turn(template, calls, content="Let me check."))
    out = channels.split(turn)
    assert parsed(out) == calls
    assert out.content == "Let me check."
    assert len({c.id for c in out.tool_calls}) == 3


def test_a_tool_response_is_not_read_as_the_answer(template):
    after = [{"role": "tool", "tool_call_id": "c0", "content": json.dumps({"t": 20, "sky": 'a "clear" day'})},
             {"role": "assistant", "content": "It is 20 degrees."}]
    turn = model_turn(template, [("get_weather", {"city": "Paris"})], after=after)
    assert '<|tool_response>response:get_weather{' in turn  # the result, named after the call it answers
    out = channels.split(reply_of(turn))
    assert parsed(out) == [("get_weather", {"city": "Paris"})]
    final = turn.split("<tool_response|>", 1)[1].split("<|turn>model\n")[-1].split("<turn|>")[0]
    assert channels.split(final).content == "It is 20 degrees." and not channels.split(final).tool_calls


def test_a_thought_is_reasoning_and_the_rest_content():
    text = "<|channel>thought\nThe user wants {x}: think.\nSecond line.<channel|>The answer."
    out = channels.split(text)
    assert (out.reasoning, out.content) == ("The user wants {x}: think.\nSecond line.", "The answer.")
    for size in (1, 4, 9):
        reasoning, content, _ = streamed(text, size)
        assert (reasoning, content) == (out.reasoning, out.content)
    calls = channels.split(text + '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>')
    assert calls.reasoning == out.reasoning and parsed(calls) == [("get_weather", {"city": "Rome"})]


def test_a_marker_inside_the_answer_is_the_answers_text():
    # the template opens a thought first in the turn; a structured answer's string may hold the marker's token
    # (issue 40: a JSON answer cut at a <|channel> in its first string, the rest read as reasoning)
    for text in ('{"name": "a <|channel>b", "n": 1}', '{"name": "a <|channel>thought\nb<channel|>c"}'):
        out = channels.split(text)
        assert (out.reasoning, out.content) == (None, text)
        for size in (1, 4, 9):
            assert streamed(text, size)[:2] == ("", text)
    out = channels.split(" \n<|channel>thought\nhmm<channel|>{}")
    assert (out.reasoning, out.content) == ("hmm", "{}")


def test_streamed_calls_come_as_each_closes():
    one = '<|tool_call>call:a{x:<|"|>1<|"|>}<tool_call|>'
    two = '<|tool_call>call:b{y:2}<tool_call|>'
    s = channels.StreamSplitter(tools=True)
    s.feed("Sure." + one[:20])
    assert s.new_calls() == []
    s.feed(one[20:])
    [first] = s.new_calls()
    assert (first.name, json.loads(first.arguments)) == ("a", {"x": "1"}) and s.new_calls() == []
    s.feed(two)
    [second] = s.new_calls()
    assert second.name == "b"
    _, _, out = s.finish()
    assert [c.id for c in out.tool_calls] == [first.id, second.id] and out.content == "Sure."


def test_a_call_inside_an_open_one_waits_for_the_end():
    # an open call's string may hold a whole call's text: nothing after an open start is given out before the end
    text = '<|tool_call>call:a{x:<|"|>see <|tool_call>call:b{}<tool_call|> here<|"|>}<tool_call|>'
    s = channels.StreamSplitter(tools=True)
    s.feed(text[:-len("here<|\"|>}<tool_call|>")])
    assert s.new_calls() == []
    s.feed(text[-len("here<|\"|>}<tool_call|>"):])
    [call] = s.new_calls()
    assert call.name == "a" and "call:b" in json.loads(call.arguments)["x"]
    assert [c.name for c in s.finish()[2].tool_calls] == ["a"]


@pytest.mark.parametrize("broken", [
    '<|tool_call>call:get_weather{city:<|"|>Rome}<tool_call|>',  # an unclosed string
    "<|tool_call>call:get_weather{city:Rome,}}<tool_call|>",  # unbalanced
    "<|tool_call>call:get_weather{city}<tool_call|>",  # no value
    "<|tool_call>call:{city:1}<tool_call|>",  # no name
])
def test_a_call_that_does_not_parse_stays_text(broken):
    out = channels.split("Sure. " + broken)
    assert out.tool_calls == [] and out.content == "Sure. " + broken
