"""POST /v1/responses through a real `dglocal serve` and the official clients: openai's responses.create, .stream
and .parse, function tools with their results sent back (by previous_response_id and as full items), refusals
named as 400s, and openai-agents' default model running a tool turn."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from test_server import Server

pytestmark = pytest.mark.backend

FAST = dict(model="tiny", max_output_tokens=16, extra_body={"max_denoising_steps": 2})
# a tool without parameters: a forced call to it is a fixed string the grammar closes at once
CLOCK = {"type": "function", "name": "get_time", "description": "The time now",
         "parameters": {"type": "object", "properties": {}}, "strict": True}
FORCED = dict(model="tiny", tools=[CLOCK], tool_choice="required", parallel_tool_calls=False, max_output_tokens=48,
              extra_body={"max_denoising_steps": 4, "seed": 2})


@pytest.fixture(scope="module")
def server(tiny_f32_gguf):
    s = Server(str(tiny_f32_gguf), "-np", "2", "-c", "2048", "--alias", "tiny", "--seed", "1")
    yield s
    s.stop()


def test_text_instructions_and_items(server):
    """A string input and the same message as items are the same prompt; instructions add a system turn; a reply
    cut by max_output_tokens is incomplete, naming why."""
    c = server.client()
    plain = c.responses.create(input="hi", **FAST)
    assert plain.object == "response" and plain.id.startswith("resp_") and plain.model == "tiny"
    message = plain.output[-1]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert plain.output_text == message.content[0].text
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens
    assert (plain.status == "incomplete") == (plain.incomplete_details is not None)
    items = c.responses.create(input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}], **FAST)
    assert items.usage.input_tokens == plain.usage.input_tokens
    told = c.responses.create(input="hi", instructions="Answer in French.", **FAST)
    assert told.usage.input_tokens > plain.usage.input_tokens and told.instructions == "Answer in French."
    cut = c.responses.create(input="hi", **{**FAST, "extra_body": {"max_denoising_steps": 2, "ignore_eos": True}})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 16 and cut.output[-1].status == "incomplete"


def test_stream_events_in_order_and_text_equals_whole(server):
    c = server.client()
    kw = dict(FAST, input="Tell me a story", max_output_tokens=40,
              extra_body={"max_denoising_steps": 2, "seed": 7, "cache_prompt": False})
    whole = c.responses.create(**kw)
    events = list(c.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    names = " ".join(e.type.removeprefix("response.") for e in events)
    text_item = r"output_item\.added content_part\.added( output_text\.delta)* output_text\.done " \
                r"content_part\.done output_item\.done"
    assert re.fullmatch(rf"created in_progress {text_item} {whole.status}", names), names
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.id == events[0].response.id
    assert final.output[0].id == events[2].item.id  # the streamed item is the final response's


class Verdict(BaseModel):
    color: Literal["red", "green", "blue"]
    n: int = Field(ge=0, le=9)


def test_parse_with_a_pydantic_model(server):
    """text.format json_schema from the SDK's pydantic model: the grammar closes the object, the SDK parses it,
    whole (.parse) and streamed (.stream, which needs the stream to end with response.completed)."""
    c = server.client()
    kw = dict(model="tiny", input="Pick one", text_format=Verdict, max_output_tokens=64,
              extra_body={"max_denoising_steps": 4, "seed": 3, "cache_prompt": False})
    r = c.responses.parse(**kw)
    assert r.status == "completed", r
    assert isinstance(r.output_parsed, Verdict)
    assert r.text.format.type == "json_schema"
    with c.responses.stream(**kw) as stream:
        assert stream.get_final_response().output_parsed == r.output_parsed


def test_forced_call_and_its_result_sent_back(server):
    """tool_choice required: one function_call item with JSON arguments; its output sent back by
    previous_response_id and as the full items renders the same prompt."""
    c = server.client()
    first = c.responses.create(input="What time is it?", **FORCED)
    assert first.status == "completed", first
    calls = [o for o in first.output if o.type == "function_call"]
    assert [(t.name, json.loads(t.arguments)) for t in calls] == [("get_time", {})]
    call = calls[0]
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert first.tools[0].name == "get_time" and first.tool_choice == "required"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"time": "noon"})}
    after = dict(FAST, tools=[CLOCK])
    chained = c.responses.create(previous_response_id=first.id, input=[result], **after)
    assert chained.previous_response_id == first.id
    full = c.responses.create(input=[{"role": "user", "content": "What time is it?"},
                                     *[o.model_dump(exclude_none=True) for o in first.output], result], **after)
    assert chained.usage.input_tokens == full.usage.input_tokens > first.usage.input_tokens
    # the first turn's prompt was in a slot's cache, all but its end: a generation prompt closes with an empty
    # thinking block (thinking off) that the template leaves out of an earlier model turn
    assert chained.usage.input_tokens_details.cached_tokens > 0.9 * first.usage.input_tokens


def test_forced_call_streams(server):
    events = list(server.client().responses.create(input="What time is it?", stream=True, **FORCED))
    names = [e.type.removeprefix("response.") for e in events]
    assert names[-5:] == ["output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
                          "output_item.done", "completed"], names
    added, done = events[-5].item, events[-2].item
    assert added.id == done.id and added.status == "in_progress" and done.status == "completed"
    assert events[-1].response.output[-1].call_id == done.call_id and json.loads(done.arguments) == {}


@pytest.mark.parametrize("fields, param, words", [
    (dict(previous_response_id="resp_gone"), "previous_response_id", "resp_gone"),
    (dict(tools=[{"type": "web_search"}]), "tools", "web_search"),
    (dict(tool_choice={"type": "file_search"}), "tool_choice", "tool_choice"),
    (dict(reasoning={"effort": "extreme"}), "reasoning", "effort"),
    (dict(reasoning={"effort": "low"}, chat_template_kwargs={"enable_thinking": False}), "reasoning", "give one"),
    (dict(truncation="auto"), "truncation", "disabled"),
    (dict(include=["reasoning.encrypted_content"]), "include", "include"),
    (dict(conversation="conv_1"), "conversation", "previous_response_id"),
    (dict(max_output_tokens=0), "max_output_tokens", "max_output_tokens"),
    (dict(input=[{"type": "item_reference", "id": "x"}]), "input", "item_reference"),
    (dict(text={"format": {"type": "yaml"}}), "text", "json_schema"),
    (dict(chat_messages=[]), "chat_messages", "does not take"),
])
def test_misused_fields_are_named_400s(server, fields, param, words):
    status, out, _ = server.post("/v1/responses", json.dumps({"model": "tiny", "input": "hi", **fields}))
    assert status == 400, out
    assert out["error"]["param"] == param and words in out["error"]["message"], out


def test_unknown_previous_response_through_the_sdk(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().responses.create(input="hi", previous_response_id="resp_nope", **FAST)
    assert "previous_response_id" in str(e.value)


def test_history_keeps_the_most_recently_used():
    from dglocal.serving.errors import ApiError
    from dglocal.serving.responses import History

    h = History(size=2)
    h.put("a", [{"role": "user", "content": "1"}])
    h.put("b", [])
    h.get("a")  # used: "b" is now the least recently used
    h.put("c", [])
    assert h.get("a") == [{"role": "user", "content": "1"}] and h.get("c") == []
    with pytest.raises(ApiError) as e:
        h.get("b")
    assert e.value.param == "previous_response_id" and "'b'" in str(e.value)


def test_thinking_comes_back_as_a_reasoning_item(server):
    """reasoning.effort turns the template's thinking on; the thinking (pinned here by a grammar, an extension
    field) is a reasoning item before the message, whole and streamed."""
    c = server.client()
    pinned = 'root ::= "<|channel>thought\\nLet me see.<channel|>Yes."'  # GBNF reads the escape as a newline
    kw = dict(model="tiny", input="hi", reasoning={"effort": "high"}, max_output_tokens=40,
              extra_body={"max_denoising_steps": 4, "grammar": pinned})
    r = c.responses.create(**kw)
    assert r.status == "completed" and r.reasoning.effort == "high", r
    assert [o.type for o in r.output] == ["reasoning", "message"] and r.output_text == "Yes."
    assert r.output[0].content[0].text == "Let me see." and r.output[0].summary == []
    events = list(c.responses.create(stream=True, **kw))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Let me see."
    names = [e.type.removeprefix("response.") for e in events]
    assert names.index("reasoning_text.done") < names.index("output_text.delta")
    assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]
    # effort "none" is the template's default here (thinking off), and a prompt other than effort "high"'s
    off = c.responses.create(input="hi", reasoning={"effort": "none"}, **FAST)
    assert off.usage.input_tokens == c.responses.create(input="hi", **FAST).usage.input_tokens != r.usage.input_tokens


def test_openai_agents_run_a_tool_turn(server):
    """openai-agents' default model (OpenAIResponsesModel) against the server: a forced call, the tool run, its
    result the run's output; streamed and not."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    ran = []

    @agents.function_tool
    def get_time() -> str:
        """The time now."""
        ran.append(1)
        return "noon"

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
    settings = agents.ModelSettings(tool_choice="required", parallel_tool_calls=False, max_tokens=48,
                                    extra_body={"max_denoising_steps": 4, "seed": 2})
    agent = agents.Agent(name="clock", instructions="Use the tool.", tools=[get_time], model_settings=settings,
                         model=agents.OpenAIResponsesModel(model="tiny", openai_client=client),
                         tool_use_behavior="stop_on_first_tool")

    async def both():
        whole = await agents.Runner.run(agent, "What time is it?", max_turns=2)
        streamed = agents.Runner.run_streamed(agent, "What time is it?", max_turns=2)
        async for _ in streamed.stream_events():
            pass
        return whole.final_output, streamed.final_output

    assert asyncio.run(asyncio.wait_for(both(), 120)) == ("noon", "noon")
    assert ran == [1, 1]
